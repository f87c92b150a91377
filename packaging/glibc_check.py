#!/usr/bin/env python3
"""The newest GLIBC_x.y symbol version each ELF file needs (its .gnu.version_r), read in pure
Python: files, folders, and the ELF files embedded in a PyInstaller one-file binary.

    glibc_check.py PATH...              one line per ELF, then the highest need
    glibc_check.py --max 2.31 PATH...   also exit 1, naming each file (and symbols) above 2.31
    glibc_check.py --summary PATH...    only the highest need (packaging/build.sh prints it)
Exit codes: 0 fine, 1 a file needs more than --max, 2 bad usage or a path that does not exist.
"""
from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field

SHT_DYNSYM, SHT_GNU_VERNEED, SHT_GNU_VERSYM = 11, 0x6FFFFFFE, 0x6FFFFFFF
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_STRTAB, DT_VERNEED, DT_VERNEEDNUM = 0, 5, 0x6FFFFFFE, 0x6FFFFFFF
GLIBC_RE = re.compile(r"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?$")
# PyInstaller's one-file archive: a cookie at the end (magic, package length, TOC offset, TOC
# length, python version, libpython name), TOC entries of (entry length, offset, stored length,
# length, compressed flag, type) then the name.
MEI_MAGIC = b"MEI\014\013\012\013\016"
MEI_COOKIE = struct.Struct("!8sIIII64s")
MEI_ENTRY = struct.Struct("!IIIIBc")

Version = tuple[int, ...]


@dataclass
class ElfNeeds:
    """What one ELF file needs from glibc: every GLIBC_ version, and the symbols of each."""

    name: str
    versions: set[Version] = field(default_factory=set)
    symbols: dict[Version, set[str]] = field(default_factory=dict)

    @property
    def highest(self) -> Version | None:
        return max(self.versions) if self.versions else None


def fmt(version: Version | None) -> str:
    return "GLIBC_" + ".".join(map(str, version)) if version else "no GLIBC version"


def parse_version(text: str) -> Version:
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise ValueError(text)
    return tuple(int(g) for g in m.groups() if g is not None)


def _cstr(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset:end if end >= 0 else len(data)].decode("latin-1")


class _Elf:
    """Just enough of an ELF reader for the version-needs tables (32/64 bit, either byte order)."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
            raise ValueError("not an ELF file")
        self.data = data
        self.is64 = data[4] == 2
        self.end = "<" if data[5] == 1 else ">"
        if self.is64:
            hdr = struct.unpack_from(self.end + "HHIQQQIHHHHHH", data, 16)
        else:
            hdr = struct.unpack_from(self.end + "HHIIIIIHHHHHH", data, 16)
        (_, _, _, _, self.phoff, self.shoff, _, _, self.phentsize, self.phnum,
         self.shentsize, self.shnum, _) = hdr

    def u(self, fmt_: str, offset: int) -> tuple[int, ...]:
        return struct.unpack_from(self.end + fmt_, self.data, offset)

    def sections(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """(type, addr, offset, size, link, info, entsize) of each section header."""
        out = []
        for i in range(self.shnum if self.shoff else 0):
            at = self.shoff + i * self.shentsize
            if self.is64:
                _, typ, _, addr, off, size, link, info, _, ent = self.u("IIQQQQIIQQ", at)
            else:
                _, typ, _, addr, off, size, link, info, _, ent = self.u("IIIIIIIIII", at)
            out.append((typ, addr, off, size, link, info, ent))
        return out

    def verneed(self, offset: int, count: int, strtab: int) -> dict[int, str]:
        """{version index: name} of every version needed (Elf_Verneed / Elf_Vernaux chains)."""
        names: dict[int, str] = {}
        for _ in range(count):
            _, cnt, _, aux, nxt = self.u("HHIII", offset)
            at = offset + aux
            for _ in range(cnt):
                _, _, other, name, anext = self.u("IHHII", at)
                names[other & 0x7FFF] = _cstr(self.data, strtab + name)
                if not anext:
                    break
                at += anext
            if not nxt:
                break
            offset += nxt
        return names

    def _vaddr_to_offset(self, vaddr: int) -> int:
        for i in range(self.phnum):
            at = self.phoff + i * self.phentsize
            if self.is64:
                typ, _, off, va, _, filesz, _, _ = self.u("IIQQQQQQ", at)
            else:
                typ, off, va, _, filesz, _, _, _ = self.u("IIIIIIII", at)
            if typ == PT_LOAD and va <= vaddr < va + filesz:
                return vaddr - va + off
        raise ValueError("dynamic table points outside the file")

    def _from_dynamic(self) -> dict[int, str]:
        """For files without section headers: DT_VERNEED through the program headers."""
        for i in range(self.phnum):
            at = self.phoff + i * self.phentsize
            if self.is64:
                typ, _, off, _, _, filesz, _, _ = self.u("IIQQQQQQ", at)
                dyn_fmt, step = "qQ", 16
            else:
                typ, off, _, _, filesz, _, _, _ = self.u("IIIIIIII", at)
                dyn_fmt, step = "iI", 8
            if typ != PT_DYNAMIC:
                continue
            tags: dict[int, int] = {}
            for pos in range(off, off + filesz, step):
                tag, val = self.u(dyn_fmt, pos)
                if tag == DT_NULL:
                    break
                tags[tag] = val
            if DT_VERNEED in tags and DT_STRTAB in tags:
                return self.verneed(self._vaddr_to_offset(tags[DT_VERNEED]),
                                    tags.get(DT_VERNEEDNUM, 0),
                                    self._vaddr_to_offset(tags[DT_STRTAB]))
        return {}

    def needs(self, name: str) -> ElfNeeds:
        result = ElfNeeds(name)
        secs = self.sections()
        names: dict[int, str] = {}
        for typ, _, off, _, link, info, _ in secs:
            if typ == SHT_GNU_VERNEED and link < len(secs):
                names.update(self.verneed(off, info, secs[link][2]))
        if not secs:
            names = self._from_dynamic()
        glibc = {idx: parse_version(m.group(0)[6:]) for idx, n in names.items()
                 if (m := GLIBC_RE.match(n))}
        result.versions.update(glibc.values())
        # Which symbols ask for which version: .gnu.version runs parallel to .dynsym.
        versym = next((s for s in secs if s[0] == SHT_GNU_VERSYM), None)
        dynsym = next((s for s in secs if s[0] == SHT_DYNSYM), None)
        if glibc and versym and dynsym and dynsym[6] and dynsym[4] < len(secs):
            strtab = secs[dynsym[4]][2]
            for i in range(dynsym[3] // dynsym[6]):
                ver = glibc.get(self.u("H", versym[2] + 2 * i)[0] & 0x7FFF)
                if ver is None:
                    continue
                name_off = self.u("I", dynsym[2] + i * dynsym[6])[0]
                result.symbols.setdefault(ver, set()).add(_cstr(self.data, strtab + name_off))
        return result


def embedded(data: bytes, name: str) -> list[tuple[str, bytes]]:
    """The ELF files inside a PyInstaller one-file binary, as (name!member, bytes)."""
    at = data.rfind(MEI_MAGIC, max(0, len(data) - 65536))
    if at < 0 or at + MEI_COOKIE.size > len(data):
        return []
    _, pkg_len, toc_off, toc_len, _, _ = MEI_COOKIE.unpack_from(data, at)
    start = at + MEI_COOKIE.size - pkg_len
    if start < 0:
        return []
    out = []
    pos, toc_end = start + toc_off, start + toc_off + toc_len
    while pos + MEI_ENTRY.size <= toc_end:
        entry_len, off, stored, _, compressed, _ = MEI_ENTRY.unpack_from(data, pos)
        if entry_len < MEI_ENTRY.size:
            break
        member = data[pos + MEI_ENTRY.size:pos + entry_len].rstrip(b"\0").decode("utf-8", "replace")
        blob = data[start + off:start + off + stored]
        pos += entry_len
        try:
            # Only ELF members are worth inflating whole: peek at the first four bytes.
            if compressed and zlib.decompressobj().decompress(blob, 4) == b"\x7fELF":
                blob = zlib.decompress(blob)
            if blob[:4] == b"\x7fELF":
                out.append((f"{name}!{member}", blob))
        except zlib.error:
            continue
    return out


def check_file(path: str) -> list[ElfNeeds]:
    """Needs of `path` if it is an ELF file (and of the ELF files it embeds); [] otherwise."""
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return []
        data = f.read()
    data = b"\x7fELF" + data
    try:
        found = [_Elf(data).needs(path)]
    except (ValueError, struct.error, IndexError):
        return []
    for member, blob in embedded(data, path):
        try:
            found.append(_Elf(blob).needs(member))
        except (ValueError, struct.error, IndexError):
            continue
    return found


def walk(paths: list[str]) -> list[ElfNeeds]:
    found: list[ElfNeeds] = []
    for top in paths:
        if os.path.isdir(top):
            for dirpath, dirs, files in os.walk(top):
                dirs.sort()
                for fname in sorted(files):
                    full = os.path.join(dirpath, fname)
                    if os.path.isfile(full) and not os.path.islink(full):
                        found.extend(check_file(full))
        else:
            found.extend(check_file(top))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", metavar="PATH", help="ELF file or folder")
    ap.add_argument("--max", metavar="X.Y", help="fail (exit 1) when a file needs a newer glibc")
    ap.add_argument("--summary", action="store_true", help="print only the highest need")
    args = ap.parse_args(argv)
    try:
        floor = parse_version(args.max) if args.max else None
    except ValueError:
        print(f"glibc_check.py: --max {args.max!r} is not a glibc version; accepted: X.Y like 2.31",
              file=sys.stderr)
        return 2
    for p in args.paths:
        if not os.path.exists(p):
            print(f"glibc_check.py: {p}: no such file or folder", file=sys.stderr)
            return 2
    found = walk(args.paths)
    if not found:
        print(f"glibc_check.py: no ELF file under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    top = max(found, key=lambda n: n.highest or ())
    if not args.summary:
        for needs in found:
            print(f"{fmt(needs.highest):18s} {needs.name}")
    print(f"highest glibc needed: {fmt(top.highest)} ({top.name}; {len(found)} ELF files)")
    if floor is None:
        return 0
    bad = [n for n in found if n.highest and n.highest > floor]
    for needs in bad:
        syms = sorted(s for v, names in needs.symbols.items() if v > floor for s in names)
        print(f"glibc_check.py: {needs.name} needs {fmt(needs.highest)} > {fmt(floor)}"
              + (f" for {', '.join(syms)}" if syms else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
