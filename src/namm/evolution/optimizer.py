"""CMA-ES as in the NAMM reference, on top of pycma, with a complete pickle-free save/restore.

:class:`CMAES` wraps ``cma.CMAEvolutionStrategy`` with the reference settings: population ``popsize``,
``mu = popsize // 2`` positively weighted parents for the mean (pycma's default log-weights, negative
"active" weights for the rest), mean coefficient ``c_m = 1``, ``sigma0 = 0.065``, ``mean0 = 0``, no
mirrored sampling, full covariance (or pycma's separable/diagonal variant with ``diagonal=True``).
Fitness is **maximised** (pycma minimises; the wrapper negates).

pycma samples from numpy's *global* legacy RNG. The wrapper owns a private copy of that RNG state: it
swaps it in around every pycma call and out again afterwards, so other code using ``np.random`` neither
perturbs nor is perturbed by the optimiser, and the state can be saved exactly.

:meth:`CMAES.state_dict` returns the complete state: every array of the pycma object graph (mean, sigma,
covariance or diagonal scaling, B and D, evolution paths, the last population, fitness history, ...)
under its attribute path for safetensors, and a JSON tree of all scalars, counters and object structure
(see :mod:`namm.evolution._statecodec`), plus the RNG state. Not stored (rebuilt from the configuration
when loading): pycma's option dictionary, its data logger (disabled), its wall-clock timers and function
references. :meth:`CMAES.save` / :meth:`CMAES.load` write/read ``optimizer.safetensors`` and
``optimizer.json``. A state only loads under the pycma version that saved it (its internals are stored).
The RNG swap makes a :class:`CMAES` unsafe to use from several threads at once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cma
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save

from namm.errors import NammError
from namm.evolution import _statecodec
from namm.evolution._io import atomic_write_bytes, atomic_write_json

FORMAT = "namm-cmaes-v1"
_ROOT = "cma"
_META_KEY = "namm_meta"


class CMAES:
    """Maximising CMA-ES (pycma) with the NAMM reference settings and an exact, pickle-free state.

    Args:
        n_params: dimension of the search space.
        popsize: population size lambda; ``mu = popsize // 2`` parents update the mean.
        sigma0: initial step size.
        seed: seed of the optimiser's private RNG (any int, 0 included).
        diagonal: use the separable (diagonal covariance) CMA-ES instead of the full covariance.
        mean0: initial mean (default: zeros).
        csa: force cumulative step-size adaptation (the reference's); pycma's default switches to TPA
            above 300 dimensions. Off by default so that runs saved without it resume unchanged.
    """

    def __init__(
        self,
        n_params: int,
        popsize: int,
        sigma0: float = 0.065,
        seed: int = 0,
        diagonal: bool = False,
        mean0: np.ndarray | None = None,
        csa: bool = False,
    ) -> None:
        if int(n_params) < 1:
            raise NammError(f"n_params must be >= 1, got {n_params}.")
        if int(popsize) < 3:
            raise NammError(f"popsize must be >= 3 (pycma refuses smaller populations), got {popsize}.")
        if not sigma0 > 0:
            raise NammError(f"sigma0 must be > 0, got {sigma0}.")
        mean0 = np.zeros(n_params) if mean0 is None else np.asarray(mean0, dtype=np.float64).reshape(-1)
        if mean0.shape != (n_params,):
            raise NammError(f"mean0 has {mean0.size} values, expected n_params={n_params}.")
        self.config = {
            "n_params": int(n_params),
            "popsize": int(popsize),
            "sigma0": float(sigma0),
            "seed": int(seed),
            "diagonal": bool(diagonal),
        }
        if csa:  # only stored when set, so states saved before the option existed still match
            self.config["csa"] = True
        self._rng_state = np.random.RandomState(int(seed) % 2**32).get_state()
        opts = {
            "popsize": int(popsize),
            "CMA_mu": int(popsize) // 2,
            "CMA_cmean": 1.0,
            "CMA_diagonal": bool(diagonal),
            "CMA_mirrors": 0,
            "seed": float("nan"),  # pycma must not reseed the global RNG: the wrapper owns the RNG state
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        if csa:
            opts["AdaptSigma"] = cma.sigma_adaptation.CMAAdaptSigmaCSA
        with self._own_rng():
            self._es = cma.CMAEvolutionStrategy(mean0, float(sigma0), opts)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run pycma on the optimiser's RNG state, leaving numpy's global RNG as it was."""
        outer = np.random.get_state()
        np.random.set_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(outer)

    # ----------------------------------------------------------------------------- ask / tell
    def ask(self) -> np.ndarray:
        """Sample a new population, ``(popsize, n_params)`` float64."""
        with self._own_rng():
            return np.array(self._es.ask(), dtype=np.float64)

    def tell(self, solutions: np.ndarray, fitness: np.ndarray) -> None:
        """Update from the population returned by :meth:`ask` and its fitness (higher is better)."""
        solutions = np.asarray(solutions, dtype=np.float64)
        fitness = np.asarray(fitness, dtype=np.float64).reshape(-1)
        if solutions.shape != (self.popsize, self.n_params) or fitness.shape != (self.popsize,):
            raise NammError(
                f"tell() expects ({self.popsize}, {self.n_params}) solutions and {self.popsize} fitness values, "
                f"got {solutions.shape} and {fitness.shape}."
            )
        if not np.all(np.isfinite(fitness)):
            raise NammError(f"tell() got non-finite fitness values: {fitness.tolist()}.")
        with self._own_rng():
            self._es.tell(list(solutions), [-float(f) for f in fitness])

    # ----------------------------------------------------------------------------- views
    @property
    def n_params(self) -> int:
        return self.config["n_params"]

    @property
    def popsize(self) -> int:
        return self.config["popsize"]

    @property
    def diagonal(self) -> bool:
        return self.config["diagonal"]

    @property
    def mean(self) -> np.ndarray:
        """The current distribution mean (the deployed solution), a copy."""
        return np.array(self._es.mean, dtype=np.float64)

    @property
    def sigma(self) -> float:
        """The current overall step size."""
        return float(self._es.sigma)

    @property
    def generation(self) -> int:
        """Number of finished generations (``tell`` calls)."""
        return int(self._es.countiter)

    @property
    def C(self) -> np.ndarray:
        """Covariance shape (without ``sigma**2``): ``(n, n)`` in full mode, its diagonal ``(n,)`` in diagonal mode."""
        scale = np.broadcast_to(np.asarray(self._es.sigma_vec.scaling, dtype=np.float64), (self.n_params,))
        if self.diagonal:
            return np.array(scale**2)
        return scale[:, None] * np.asarray(self._es.sm.C, dtype=np.float64) * scale[None, :]

    @property
    def best_ever(self) -> tuple[np.ndarray, float] | None:
        """``(params, fitness)`` of the best sample told so far, or ``None`` before the first ``tell``."""
        best = self._es.best
        if best.x is None:
            return None
        return np.array(best.x, dtype=np.float64), -float(best.f)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The complete state: ``(arrays for safetensors, JSON-able dict)``."""
        tree, tensors = _statecodec.encode(self._es, _ROOT)
        name, keys, pos, has_gauss, cached = self._rng_state
        tensors["rng/mt19937_keys"] = np.asarray(keys, dtype=np.uint32).copy()
        meta = {
            "format": FORMAT,
            "pycma_version": cma.__version__,
            "config": dict(self.config),
            "rng": {"name": str(name), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "state": tree,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the configuration must match this object's."""
        if meta.get("format") != FORMAT:
            raise NammError(f"Not a {FORMAT} optimizer state (format={meta.get('format')!r}).")
        if meta["config"] != self.config:
            raise NammError(
                f"Optimizer state was saved with config {meta['config']}, this optimizer has {self.config}."
            )
        if meta.get("pycma_version") != cma.__version__:
            raise NammError(
                f"Optimizer state was saved with pycma {meta.get('pycma_version')}, but pycma {cma.__version__} is "
                "installed; its internal state layout may differ. Install the saving version to resume."
            )
        rng = meta["rng"]
        self._rng_state = (
            rng["name"],
            np.asarray(tensors["rng/mt19937_keys"], dtype=np.uint32),
            rng["pos"],
            rng["has_gauss"],
            rng["cached_gaussian"],
        )
        _statecodec.decode_into(self._es, meta["state"], tensors, _ROOT)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> CMAES:
        """Build an optimiser from its configuration and restore its state."""
        opt = cls(**meta["config"])
        opt.load_state_dict(tensors, meta)
        return opt

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None, name: str = "optimizer") -> None:
        """Write ``<name>.safetensors`` and ``<name>.json`` in ``directory`` (each atomically).

        The safetensors header also embeds the JSON part, so the ``.safetensors`` file alone is a complete,
        self-consistent checkpoint even if a crash falls between the two writes; the ``.json`` file is its
        human-readable mirror. ``extra`` is stored alongside (e.g. the training loop's bookkeeping).
        """
        tensors, meta = self.state_dict()
        meta["extra"] = extra or {}
        text = json.dumps(meta, allow_nan=False, sort_keys=True)
        directory = Path(directory)
        atomic_write_bytes(directory / f"{name}.safetensors", st_save(tensors, metadata={_META_KEY: text}))
        atomic_write_json(directory / f"{name}.json", meta)

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str = "optimizer") -> tuple[CMAES, dict[str, Any]]:
        """Read what :meth:`save` wrote; returns ``(optimizer, extra)``."""
        path = Path(directory) / f"{name}.safetensors"
        if not path.exists():
            raise NammError(f"No optimizer state at {path}.")
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if _META_KEY not in header:
            raise NammError(f"{path} has no embedded optimizer metadata; not written by namm.")
        meta = json.loads(header[_META_KEY])
        json_path = path.with_suffix(".json")
        if not json_path.exists() or _read_json(json_path) != meta:
            atomic_write_json(json_path, meta)  # the mirror was stale (crash between the two writes)
        return cls.from_state_dict(tensors, meta), meta.get("extra", {})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
