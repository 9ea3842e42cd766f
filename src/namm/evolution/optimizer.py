"""CMA-ES as in the NAMM reference, on top of pycma, saved as the fitness it was told and restored by replay.

:class:`CMAES` wraps ``cma.CMAEvolutionStrategy`` with the reference settings: population ``popsize``,
``mu = popsize // 2`` positively weighted parents for the mean (pycma's default log-weights, negative
"active" weights for the rest), mean coefficient ``c_m = 1``, ``sigma0 = 0.065``, ``mean0 = 0``, no
mirrored sampling, full covariance (or pycma's separable/diagonal variant with ``diagonal=True``).
Fitness is **maximised** (pycma minimises; the wrapper negates).

pycma samples from numpy's *global* legacy RNG. The wrapper owns a private copy of that RNG state: it
swaps it in around every pycma call and out again afterwards, so other code using ``np.random`` neither
perturbs nor is perturbed by the optimiser. The RNG swap makes a :class:`CMAES` unsafe to use from several
threads at once.

Saving by replay. Given its configuration and seed, the optimiser is a deterministic function of the
fitness values it was told: every population comes from ``ask()`` on the private RNG, and :meth:`tell`
only accepts the population of the last ``ask()``. :meth:`state_dict` therefore stores the configuration,
the initial mean, the fitness told at every generation (and how many ``ask()`` calls preceded each
``tell``), plus a SHA-256 digest of the resulting state (mean, step size, covariance, evolution paths,
RNG state, best solution; :meth:`digest`). :meth:`load_state_dict` rebuilds a fresh optimiser from the
configuration, replays the ``ask``/``tell`` sequence and compares the digest: the restored state is
bit-for-bit the saved one, or loading fails. :meth:`save` / :meth:`load` write/read one strict JSON file,
``optimizer.json``, atomically.

Why this and not pickle or a hand-written codec of pycma's object graph: the file holds only numbers and
strings, so loading it runs no code and instantiates nothing from the file (a pickle, even through a
restricted unpickler, can call constructors of allowed classes, and pycma evaluates option strings); it is
independent of pycma's internal attribute layout, so no codec of its objects has to be maintained. A
file namm did not write (wrong format, a tampered fitness, another pycma or numpy/BLAS that computes the
replay differently) fails the format check or the digest. The file also keeps the resulting mean and step
size: when only the digest differs and the replayed mean and step size agree with the saved ones to
:data:`REPLAY_RTOL` (a fresh machine whose BLAS rounds the eigendecomposition differently), the run resumes
with a :class:`ReplayDrift` warning instead of being lost; anything further off is refused with the reason. The price is
the replay time on load (one ``ask``/``tell`` per finished generation, without any model evaluation).

States of the previous format (``namm-cmaes-v1``: ``optimizer.safetensors`` + ``optimizer.json``, an
encoding of pycma's internals) are refused with a message naming the last commit that reads them
(:data:`LEGACY_COMMIT`): a run started with it resumes with that commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cma
import numpy as np

from namm.atomic import atomic_write_json
from namm.errors import NammError

FORMAT = "namm-cmaes-v2"
#: Relative tolerance within which a replay on other numerics (another BLAS or CPU) is accepted, with a
#: warning, when its digest differs: the saved mean and step size must agree to this precision. A changed
#: fitness value moves them by far more (CMA-ES is rank-based: any other ranking is another update).
REPLAY_RTOL = 1e-6


class ReplayDrift(UserWarning):
    """A resumed optimizer state equals the saved one to :data:`REPLAY_RTOL`, not bit for bit."""

LEGACY_FORMAT = "namm-cmaes-v1"
#: the last commit that saves and loads :data:`LEGACY_FORMAT` states.
LEGACY_COMMIT = "b1019d4"


def _legacy_error(path: Path) -> NammError:
    return NammError(
        f"{path} is a {LEGACY_FORMAT} optimizer state from an older namm; resume this run with namm at commit "
        f"{LEGACY_COMMIT} (git checkout {LEGACY_COMMIT}), or start a new run."
    )


class CMAES:
    """Maximising CMA-ES (pycma) with the NAMM reference settings and an exact state saved as its fitness history.

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
        self._mean0 = mean0.copy()
        self._history: list[dict[str, Any]] = []  # per finished generation: {"asks": int, "fitness": [P floats]}
        self._asks = 0  # ask() calls since the last tell()
        self._asked: np.ndarray | None = None  # the population of the last ask()
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
            population = np.array(self._es.ask(), dtype=np.float64)
        self._asks += 1
        self._asked = population.copy()
        return population

    def tell(self, solutions: np.ndarray, fitness: np.ndarray) -> None:
        """Update from the population returned by the last :meth:`ask` and its fitness (higher is better)."""
        solutions = np.asarray(solutions, dtype=np.float64)
        fitness = np.asarray(fitness, dtype=np.float64).reshape(-1)
        if solutions.shape != (self.popsize, self.n_params) or fitness.shape != (self.popsize,):
            raise NammError(
                f"tell() expects ({self.popsize}, {self.n_params}) solutions and {self.popsize} fitness values, "
                f"got {solutions.shape} and {fitness.shape}."
            )
        if not np.all(np.isfinite(fitness)):
            raise NammError(f"tell() got non-finite fitness values: {fitness.tolist()}.")
        if self._asked is None or not np.array_equal(solutions, self._asked):
            raise NammError("tell() takes the population returned by the last ask() (the state is saved as the "
                            "fitness told and replayed from the seed).")
        with self._own_rng():
            self._es.tell(list(solutions), [-float(f) for f in fitness])
        self._history.append({"asks": self._asks, "fitness": [float(f) for f in fitness]})
        self._asks, self._asked = 0, None

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
    def digest(self) -> str:
        """SHA-256 of the state that drives future generations: counters, mean, sigma, covariance, evolution
        paths, RNG state and the best solution (what :meth:`load_state_dict` checks after a replay)."""
        es, h = self._es, hashlib.sha256()
        _, keys, pos, has_gauss, cached = self._rng_state
        best = self.best_ever
        parts: list[Any] = [self.generation, int(es.countevals), self.sigma, self.mean, self.C,
                            getattr(es, "pc", None), getattr(es.adapt_sigma, "ps", None),
                            np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached),
                            None if best is None else best[0], None if best is None else best[1]]
        for part in parts:
            if isinstance(part, np.ndarray) or (part is not None and not np.isscalar(part)):
                arr = np.ascontiguousarray(part)
                h.update(f"{arr.dtype.str}{arr.shape}".encode())
                h.update(arr.tobytes())
            else:
                h.update(repr(part).encode())
            h.update(b"|")
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """The complete state as a JSON-able dict (see the module docstring)."""
        return {
            "format": FORMAT,
            "pycma_version": cma.__version__,
            "numpy_version": np.__version__,
            "config": dict(self.config),
            "mean0": [float(v) for v in self._mean0],
            "generations": [dict(g, fitness=list(g["fitness"])) for g in self._history],
            "pending_asks": self._asks,
            "digest": self.digest(),
            "mean": [float(v) for v in self.mean],
            "sigma": float(self.sigma),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` into this fresh optimiser by replaying its generations.

        Raises:
            NammError: a file of another format, another configuration, malformed fields, an optimiser that
                was already used, or a replay that does not reproduce the saved digest.
        """
        _check_format(state)
        if state.get("config") != self.config:
            raise NammError(
                f"Optimizer state was saved with config {state.get('config')}, this optimizer has {self.config}."
            )
        if self.generation or self._asks:
            raise NammError("load_state_dict() needs a fresh optimizer (no ask() or tell() yet).")
        mean0, generations, pending = state.get("mean0"), state.get("generations"), state.get("pending_asks")
        if not _floats(mean0, self.n_params) or not np.array_equal(np.asarray(mean0, dtype=np.float64), self._mean0):
            raise NammError("Optimizer state has another initial mean than this optimizer.")
        if not isinstance(generations, list) or not _count(pending) or not all(
            isinstance(g, dict) and _count(g.get("asks")) and g["asks"] >= 1 and _floats(g.get("fitness"), self.popsize)
            for g in generations
        ):
            raise NammError("Optimizer state is malformed (generations or pending_asks); not written by namm.")
        for g in generations:
            for _ in range(g["asks"]):
                population = self.ask()
            self.tell(population, np.asarray(g["fitness"], dtype=np.float64))
        for _ in range(pending):
            self.ask()
        if self.digest() == state.get("digest"):
            return
        saved_mean, saved_sigma = state.get("mean"), state.get("sigma")
        close = (_floats(saved_mean, self.n_params) and isinstance(saved_sigma, (int, float))
                 and np.allclose(self.mean, saved_mean, rtol=REPLAY_RTOL, atol=REPLAY_RTOL * max(self.sigma, 1e-12))
                 and math.isclose(self.sigma, saved_sigma, rel_tol=REPLAY_RTOL))
        versions = (f"it was written with pycma {state.get('pycma_version')} / numpy {state.get('numpy_version')} "
                    f"(installed: pycma {cma.__version__} / numpy {np.__version__})")
        if not close:
            raise NammError(
                f"Replaying the optimizer state's {len(generations)} generations does not reproduce its digest nor "
                f"its mean and step size: the file was altered, or {versions} on a machine whose numerics differ "
                "that much. Resume where it was written."
            )
        warnings.warn(ReplayDrift(
            f"The optimizer state's replay matches its saved mean and step size to {REPLAY_RTOL:g} but not bit for "
            f"bit ({versions}, or this machine's BLAS rounds differently); the run continues from the replayed "
            "state, so later generations will not repeat the original machine's bit for bit."), stacklevel=2)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CMAES:
        """Build an optimiser from a state's configuration and initial mean, and replay the state."""
        config, mean0 = state.get("config"), state.get("mean0")
        _check_format(state)
        if not isinstance(config, dict) or not isinstance(mean0, list):
            raise NammError("Optimizer state is malformed (config or mean0); not written by namm.")
        try:
            opt = cls(**config, mean0=np.asarray(mean0, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise NammError(f"Optimizer state has an invalid config {config} ({err}); not written by namm.") from None
        opt.load_state_dict(state)
        return opt

    @staticmethod
    def saved_in(directory: str | os.PathLike, name: str = "optimizer") -> bool:
        """Whether ``directory`` holds a saved optimizer state (of this or the legacy format)."""
        d = Path(directory)
        return (d / f"{name}.json").exists() or (d / f"{name}.safetensors").exists()

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None, name: str = "optimizer") -> None:
        """Write ``<name>.json`` in ``directory`` atomically; ``extra`` (e.g. the loop's bookkeeping) goes along."""
        atomic_write_json(Path(directory) / f"{name}.json", {**self.state_dict(), "extra": extra or {}})

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str = "optimizer") -> tuple[CMAES, dict[str, Any]]:
        """Read what :meth:`save` wrote; returns ``(optimizer, extra)``."""
        path = Path(directory) / f"{name}.json"
        if not path.exists():
            legacy = path.with_suffix(".safetensors")
            if legacy.exists():
                raise _legacy_error(legacy)
            raise NammError(f"No optimizer state at {path}.")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise NammError(f"{path} is not readable JSON ({err}); not an optimizer state written by namm.") from None
        if not isinstance(state, dict):
            raise NammError(f"{path} is not an optimizer state written by namm.")
        if state.get("format") == LEGACY_FORMAT:
            raise _legacy_error(path)  # names the run's file, not just the format
        try:
            opt = cls.from_state_dict(state)
        except NammError as err:
            raise NammError(f"{path}: {err}") from None
        return opt, state.get("extra", {})


def _check_format(state: dict[str, Any]) -> None:
    if state.get("format") == LEGACY_FORMAT:
        raise NammError(f"This is a {LEGACY_FORMAT} optimizer state; load it with namm at commit {LEGACY_COMMIT}.")
    if state.get("format") != FORMAT:
        raise NammError(f"Not a {FORMAT} optimizer state (format={state.get('format')!r}); not written by namm.")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _floats(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
