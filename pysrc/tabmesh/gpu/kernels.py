"""WGSL kernel sources: where they live and what interface they declare.

Every kernel in wgsl/ follows one convention so that Python can bind it without a
per-kernel table:
  * entry point `main`;
  * all resources in @group(0);
  * at most one `var<uniform>` whose type is a struct of 4-byte scalars (u32, i32, f32):
    the shapes, offsets and flags of one dispatch (never pasted into the shader text);
  * storage buffers addressed by variable name from Python; so are textures (`texture_2d<T>`,
    read with textureLoad) and write-only storage textures (`texture_storage_2d<FMT, write>`).
`parse_interface` reads those declarations, so the bind group layout is explicit (which
lets the uniform binding use a dynamic offset) and the uniform struct is packed by field
name with a clear error for a missing or unknown field.
"""

from __future__ import annotations

import re
import struct
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

IN_PYODIDE = sys.platform == "emscripten"

# In the browser the kernels are fetched relative to the page; the lead may point this
# elsewhere before the first kernel is built.
WGSL_BASE_URL = "wgsl/"

_source_cache: dict[str, str] = {}


def wgsl_dir() -> Path:
    """Repository's wgsl/ folder (pysrc/tabmesh/gpu/kernels.py -> repo root)."""
    return Path(__file__).resolve().parents[3] / "wgsl"


def read_wgsl_file(name: str) -> str:
    """Native only: the text of wgsl/NAME.wgsl."""
    path = wgsl_dir() / f"{name}.wgsl"
    if not path.is_file():
        raise FileNotFoundError(f"no WGSL kernel {name!r}: expected {path}")
    return path.read_text()


async def load_wgsl(name: str) -> str:
    """The text of kernel NAME (a file natively, a fetch of WGSL_BASE_URL/NAME.wgsl in
    Pyodide), with its ``//!include LIB`` lines replaced by wgsl/LIB.wgsl: functions and
    constants shared by several kernels (a library declares no bindings)."""
    if name not in _source_cache:
        _source_cache[name] = await _expand_includes(name, await _fetch_wgsl(name), ())
    return _source_cache[name]


async def _fetch_wgsl(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"bad kernel name {name!r}: use letters, digits and '_'")
    if not IN_PYODIDE:
        return read_wgsl_file(name)
    from pyodide.http import pyfetch  # type: ignore[import-not-found]

    url = f"{WGSL_BASE_URL}{name}.wgsl"
    resp = await pyfetch(url)
    if not resp.ok:
        raise FileNotFoundError(f"no WGSL kernel {name!r}: GET {url} -> HTTP {resp.status}")
    return await resp.string()


_INCLUDE = re.compile(r"^//!include ([A-Za-z0-9_]+)[ \t]*$", re.MULTILINE)


async def _expand_includes(name: str, text: str, seen: tuple[str, ...]) -> str:
    parts, last = [], 0
    for m in _INCLUDE.finditer(text):
        lib = m.group(1)
        if lib in seen or lib == name:
            raise ValueError(f"WGSL include cycle: {' -> '.join((*seen, name, lib))}")
        lib_text = await _expand_includes(lib, await _fetch_wgsl(lib), (*seen, name))
        parts += [text[last:m.start()], lib_text]
        last = m.end()
    return "".join(parts) + text[last:]


@dataclass(frozen=True)
class BindingDecl:
    binding: int
    name: str
    # WebGPU buffer binding type: "uniform", "storage", "read-only-storage"; or a texture:
    # "texture-float" / "texture-uint" / "texture-sint" (sampleType unfilterable-float, uint, sint),
    # "storage-texture-FORMAT" (write-only, e.g. storage-texture-rgba32float)
    kind: str

    @property
    def is_texture(self) -> bool:
        return self.kind.startswith(("texture-", "storage-texture-"))

    @property
    def writable(self) -> bool:
        return self.kind == "storage" or self.kind.startswith("storage-texture-")


@dataclass(frozen=True)
class KernelInterface:
    storage: tuple[BindingDecl, ...]  # buffers and textures other than the uniform, in binding order
    uniform: BindingDecl | None
    fields: tuple[tuple[str, str], ...]  # uniform struct (name, scalar type), in order

    @property
    def uniform_size(self) -> int:
        return 4 * len(self.fields)

    @cached_property
    def _struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join({"u32": "I", "i32": "i", "f32": "f"}[t] for _, t in self.fields))

    @cached_property
    def storage_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.storage)

    @cached_property
    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.fields)

    def pack(self, kernel: str, params: dict) -> bytes:
        """Uniform bytes from params by field name; every field must be given."""
        if len(params) == len(self.fields):  # fast path; any problem falls through to the checks
            try:
                return self._struct.pack(*[params[n] for n in self._names])
            except (KeyError, struct.error):
                pass
        return self._pack_checked(kernel, params)

    def _pack_checked(self, kernel: str, params: dict) -> bytes:
        names = list(self._names)
        missing = [n for n in names if n not in params]
        unknown = [n for n in params if n not in names]
        if missing or unknown:
            raise TypeError(f"kernel {kernel!r} uniform fields {names}: missing {missing}, unknown {unknown}")
        out = bytearray()
        for n, t in self.fields:
            v = params[n]
            if t == "f32":
                out += struct.pack("<f", float(v))
            elif t == "u32":
                iv = int(v)
                if not 0 <= iv < 2**32:
                    raise ValueError(f"kernel {kernel!r} field {n}={v} does not fit u32")
                out += struct.pack("<I", iv)
            else:
                iv = int(v)
                if not -(2**31) <= iv < 2**31:
                    raise ValueError(f"kernel {kernel!r} field {n}={v} does not fit i32")
                out += struct.pack("<i", iv)
        return bytes(out)


_BINDING_RE = re.compile(
    r"@group\(\s*(\d+)\s*\)\s*@binding\(\s*(\d+)\s*\)\s*var\s*<\s*(uniform|storage)\s*(?:,\s*(read|read_write)\s*)?>"
    r"\s*(\w+)\s*:\s*([^;]+);"
)
_TEXTURE_RE = re.compile(
    r"@group\(\s*(\d+)\s*\)\s*@binding\(\s*(\d+)\s*\)\s*var\s+(\w+)\s*:\s*"
    r"(texture_2d\s*<\s*(f32|u32|i32)\s*>|texture_storage_2d\s*<\s*(\w+)\s*,\s*write\s*>)\s*;"
)
_TEXTURE_KIND = {"f32": "texture-float", "u32": "texture-uint", "i32": "texture-sint"}
_STRUCT_RE = re.compile(r"struct\s+(\w+)\s*\{([^}]*)\}")
_FIELD_RE = re.compile(r"(\w+)\s*:\s*(\w+)")


def parse_interface(name: str, source: str) -> KernelInterface:
    text = re.sub(r"//[^\n]*", "", source)
    structs = {m.group(1): m.group(2) for m in _STRUCT_RE.finditer(text)}
    storage, uniform, fields = [], None, ()
    for m in _BINDING_RE.finditer(text):
        group, binding, space, access, var, typ = m.groups()
        if group != "0":
            raise ValueError(f"kernel {name!r}: only @group(0) is supported ({var} is in group {group})")
        if space == "uniform":
            if uniform is not None:
                raise ValueError(f"kernel {name!r}: more than one uniform binding")
            uniform = BindingDecl(int(binding), var, "uniform")
            typ = typ.strip()
            if typ not in structs:
                raise ValueError(f"kernel {name!r}: uniform {var} must be a struct declared in the file")
            fields = tuple(_FIELD_RE.findall(structs[typ]))
            bad = [f for f in fields if f[1] not in ("u32", "i32", "f32")]
            if bad:
                raise ValueError(f"kernel {name!r}: uniform struct fields must be u32/i32/f32, got {bad}")
        else:
            kind = "storage" if access == "read_write" else "read-only-storage"
            storage.append(BindingDecl(int(binding), var, kind))
    for m in _TEXTURE_RE.finditer(text):
        group, binding, var, _, sample, fmt = m.groups()
        if group != "0":
            raise ValueError(f"kernel {name!r}: only @group(0) is supported ({var} is in group {group})")
        kind = _TEXTURE_KIND[sample] if sample else f"storage-texture-{fmt}"
        storage.append(BindingDecl(int(binding), var, kind))
    storage.sort(key=lambda b: b.binding)
    return KernelInterface(tuple(storage), uniform, fields)
