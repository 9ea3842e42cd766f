"""Pickle-free (de)serialisation of a pycma object graph: arrays to a flat tensor dict, the rest to JSON.

:func:`encode` walks an object's attributes recursively. Every numpy array goes into a ``{key: array}``
dict (for safetensors) under its attribute path; scalars, strings, lists, tuples, dicts and the nested
pycma objects become a JSON tree that records their classes; an object reachable along two paths is
stored once and referenced from the second path, so aliasing (``es.C is es.sm.C``) is restored.

Configuration-derived parts are not stored: option dictionaries, loggers, wall-clock timers and
functions. :func:`decode` therefore writes the state *into a freshly constructed object of the same
configuration*, keeping those parts from the fresh object. Only classes defined in the ``cma`` package are
ever instantiated, and only through ``cls.__new__`` (no code from the state file runs).
"""

from __future__ import annotations

import functools
import importlib
import math
import types
from typing import Any

import numpy as np

from namm.errors import NammError

#: attribute names that hold configuration (rebuilt from the options) rather than state.
SKIP_ATTRS = frozenset({"opts", "inopts", "inputargs", "_es_opts", "logger"})
#: pycma classes whose instances are configuration, logging or wall-clock time, not optimiser state.
SKIP_CLASSES = frozenset({"CMAOptions", "CMADataLogger", "ElapsedWCTime"})
_FUNCTION_TYPES = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    types.ModuleType,
    functools.partial,
    np.ufunc,
    type,
)


def _is_cma_class(cls: type) -> bool:
    return cls.__module__ == "cma" or cls.__module__.startswith("cma.")


def is_skipped(name: str, value: Any) -> bool:
    """True for attributes that are configuration, logging, timers or functions (kept from the fresh object)."""
    if name in SKIP_ATTRS or isinstance(value, _FUNCTION_TYPES):
        return True
    cls = type(value)
    if _is_cma_class(cls):
        return cls.__name__ in SKIP_CLASSES
    return callable(value) and not isinstance(value, (np.ndarray, np.generic, list, dict, tuple))


def _class_name(obj: Any) -> str | None:
    cls = type(obj)
    if cls in (list, dict):
        return None
    if not _is_cma_class(cls):
        raise TypeError(f"unsupported container class {cls.__module__}.{cls.__qualname__}")
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not (module == "cma" or module.startswith("cma.")):
        raise NammError(f"Optimizer state names class {name!r}; only pycma classes are allowed.")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise NammError(f"Optimizer state names class {name!r}, which this pycma version does not have.")
    return obj


def _encode_float(x: float) -> float | str:
    return x if math.isfinite(x) else repr(x)


def _decode_float(v: float | str) -> float:
    return float(v)


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.seen: dict[int, str] = {}
        self.keep_alive: list[Any] = []
        self.roots: dict[int, str] = {}
        self.root_order: dict[str, str] = {}

    def encode(self, value: Any, path: str) -> dict:
        if value is None:
            return {"t": "none"}
        if isinstance(value, np.generic):  # before float: np.float64 subclasses float
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{path}: unsupported numpy scalar {value.dtype}")
            return {"t": "scalar", "dtype": value.dtype.str, "v": self.encode(value.item(), path)}
        if isinstance(value, bool):
            return {"t": "bool", "v": value}
        if isinstance(value, int):
            return {"t": "int", "v": int(value)}
        if isinstance(value, float):
            return {"t": "float", "v": _encode_float(float(value))}
        if isinstance(value, str):
            return {"t": "str", "v": value}
        if isinstance(value, tuple) and type(value) is tuple:
            return {"t": "tuple", "items": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        ref = self.seen.get(id(value))
        if ref is not None:
            return {"t": "ref", "path": ref}
        self.seen[id(value)] = path
        self.keep_alive.append(value)
        if isinstance(value, np.ndarray):
            return self._array(value, path)
        if isinstance(value, list):
            node = {"t": "list", "cls": _class_name(value)}
            node["items"] = [self._item(v, f"{path}/{i}") for i, v in enumerate(value)]
        elif isinstance(value, dict):
            node = {"t": "dict", "cls": _class_name(value)}
            node["items"] = [[self.encode(k, path), self._item(v, f"{path}/{k!r}")] for k, v in value.items()]
        elif hasattr(value, "__dict__") and _is_cma_class(type(value)):
            node = {"t": "obj", "cls": _class_name(value)}
        else:
            raise TypeError(f"{path}: cannot store a {type(value).__module__}.{type(value).__qualname__}")
        if hasattr(value, "__dict__"):
            attrs, kept = [], []
            for k, v in vars(value).items():
                if is_skipped(k, v):
                    kept.append([k, _class_name(v) if _is_cma_class(type(v)) else None])
                else:
                    attrs.append([k, self.encode(v, f"{path}/{k}")])
            node["attrs"] = attrs  # a list, not a dict: the order must survive JSON key sorting (refs point back)
            node["kept"] = kept
        return node

    def _array(self, a: np.ndarray, path: str) -> dict:
        """An array, as its memory root (owning array) plus, for views, the view's geometry into that root.

        This keeps memory layout (C/F order) and views (``es.dC`` is a view of the covariance diagonal) exactly,
        so BLAS sees the same layouts after a restore and in-place updates propagate as before.
        """
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{path}: unsupported array dtype {a.dtype}")
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        if not (root.flags.c_contiguous or root.flags.f_contiguous) or root.dtype.kind not in "biuf":
            self.tensors[path] = np.ascontiguousarray(a)  # exotic memory: store a plain copy
            return {"t": "array", "key": path, "order": "C"}
        key = self.roots.get(id(root))
        if key is None:
            key = path if root is a else f"{path}#base"
            self.roots[id(root)] = key
            self.keep_alive.append(root)
            fortran = root.flags.f_contiguous and not root.flags.c_contiguous
            self.tensors[key] = root.T if fortran else root
            self.root_order[key] = "F" if fortran else "C"
        if root is a:
            return {"t": "array", "key": key, "order": self.root_order[key]}
        offset = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        return {
            "t": "view",
            "key": key,
            "order": self.root_order[key],
            "dtype": a.dtype.str,
            "shape": list(a.shape),
            "strides": list(a.strides),
            "offset": int(offset),
        }

    def _item(self, value: Any, path: str) -> dict:
        """A list/dict item; configuration items become ``keep`` nodes (taken from the fresh object)."""
        return {"t": "keep"} if is_skipped("", value) else self.encode(value, path)


def encode(obj: Any, root: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Encode ``obj`` into ``(json_tree, tensors)``; tensor keys are attribute paths under ``root``."""
    enc = _Encoder()
    try:
        tree = enc.encode(obj, root)
    except TypeError as e:
        raise NammError(f"Cannot save the optimizer state: {e}.") from e
    return tree, enc.tensors


class _Decoder:
    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors
        self.objects: dict[str, Any] = {}
        self.claimed: set[int] = set()
        self.roots: dict[str, np.ndarray] = {}

    def _root(self, key: str, order: str) -> np.ndarray:
        """The restored owning array stored under ``key`` (created once, in its original memory order)."""
        if key not in self.roots:
            stored = np.array(self.tensors[key], copy=True, order="C")
            self.roots[key] = np.array(stored.T, order="F") if order == "F" else stored
        return self.roots[key]

    def _reuse(self, fresh: Any, cls: type) -> Any:
        """The fresh object if it has the right class and was not used for another path, else a new one."""
        if type(fresh) is cls and id(fresh) not in self.claimed:
            self.claimed.add(id(fresh))
            return fresh
        return cls.__new__(cls)

    def decode(self, node: dict, fresh: Any, path: str) -> Any:
        t = node["t"]
        if t == "none":
            return None
        if t in ("bool", "int", "str"):
            return node["v"]
        if t == "float":
            return _decode_float(node["v"])
        if t == "scalar":
            return np.dtype(node["dtype"]).type(self.decode(node["v"], None, path))
        if t == "tuple":
            fresh_items = fresh if isinstance(fresh, tuple) else ()
            return tuple(self.decode(n, _at(fresh_items, i), f"{path}/{i}") for i, n in enumerate(node["items"]))
        if t == "ref":
            return self.objects[node["path"]]
        if t == "keep":
            if fresh is None:
                raise NammError(f"Optimizer state at {path} needs a configuration item the fresh optimizer lacks.")
            return fresh
        if t in ("array", "view"):
            root = self._root(node["key"], node["order"])
            if t == "array":
                arr = root
            else:
                buf = root.T if node["order"] == "F" else root  # C-contiguous, exposes the raw memory
                arr = np.ndarray(
                    tuple(node["shape"]), np.dtype(node["dtype"]), buf, node["offset"], tuple(node["strides"])
                )
            self.objects[path] = arr
            return arr
        cls = _resolve_class(node["cls"]) if node["cls"] else {"list": list, "dict": dict}.get(t)
        if cls is None:
            raise NammError(f"Optimizer state at {path} has no class.")
        obj = self._reuse(fresh, cls)
        self.objects[path] = obj
        old_attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        if t == "list":
            fresh_items = list(fresh) if isinstance(fresh, list) else []
            items = [self.decode(n, _at(fresh_items, i), f"{path}/{i}") for i, n in enumerate(node["items"])]
            list.clear(obj)
            list.extend(obj, items)
        elif t == "dict":
            fresh_map = dict(fresh) if isinstance(fresh, dict) else {}
            pairs = []
            for kn, vn in node["items"]:
                key = self.decode(kn, None, path)
                pairs.append((key, self.decode(vn, fresh_map.get(key), f"{path}/{key!r}")))
            dict.clear(obj)
            dict.update(obj, pairs)
        if "attrs" in node:
            attrs = {k: v for k, v in old_attrs.items() if is_skipped(k, v)}
            for k, cls_name in node.get("kept", []):
                if k not in attrs and cls_name is not None:  # created lazily by pycma (e.g. a timer): new one
                    attrs[k] = _resolve_class(cls_name)()
            for k, n in node["attrs"]:
                attrs[k] = self.decode(n, old_attrs.get(k), f"{path}/{k}")
            vars(obj).clear()
            vars(obj).update(attrs)
        return obj


def _at(seq: Any, i: int) -> Any:
    return seq[i] if i < len(seq) else None


def decode_into(obj: Any, tree: dict, tensors: dict[str, np.ndarray], root: str) -> None:
    """Write a state produced by :func:`encode` into ``obj`` (a fresh object of the same configuration)."""
    if tree.get("t") != "obj" or _resolve_class(tree["cls"]) is not type(obj):
        raise NammError(f"Optimizer state is for {tree.get('cls')!r}, not {type(obj).__qualname__}.")
    dec = _Decoder(tensors)
    dec.decode(tree, obj, root)
