"""Hostile-input-safe tar parsing: bounded USTAR header and member reads, member name/type checks, skip reasons."""

from __future__ import annotations

from shards.format import check_member_name

# Tars are untrusted (they travel between machines). Nothing here extracts a member to disk; every read is
# bounded by the index's byte range and MAX_SAMPLE_BYTES; member names must be "<key>.<member>" (no paths);
# only regular USTAR members are accepted. Every problem becomes a BadSample with one of BAD_REASONS.

# Why a sample (or a stretch of tar) was skipped: the keys of ShardLoader.stats["bad_samples_by_reason"].
BAD_REASONS = {
    "unsafe_member_name": "a tar member named with a path ('/', '\\\\', '..', absolute) or not '<key>.<member>'",
    "unsafe_member_type": "a tar member that is not a regular file (link, directory, device, pax/GNU header)",
    "member_size_mismatch": "tar member sizes disagree with the sample's byte range in the index",
    "member_too_large": "a sample or member larger than MAX_SAMPLE_BYTES (never read into memory)",
    "offset_out_of_range": "the index offset/size lies outside the tar (negative, or past its end)",
    "truncated": "the tar ends inside the sample (cut short, no end-of-archive blocks)",
    "index_mismatch": "index and tar disagree: another key (or nothing) at the offset, or tar bytes no row covers",
    "bad_tar": "unreadable tar (bad header checksum, I/O error)",
    "missing_member": "a required member is absent",
    "bad_npy": "an undecodable .npy member (object dtype/pickle, bad header, size disagreeing with its shape)",
    "shape_mismatch": "a .npy shape differs from the shape in the sample's index row",
    "bad_member": "an undecodable json/txt member",
}
# Cap on one sample's bytes (index bytes_total) and one member's size: nothing larger is read into memory.
MAX_SAMPLE_BYTES = 1 << 30


class BadSample(Exception):
    """One sample that cannot be used (see BAD_REASONS); skipped and counted by reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _header_fields(header: bytes, where: str) -> tuple[str, int, bool]:
    """(name, size, is_regular) of one 512-byte USTAR header; BadSample("bad_tar") for a bad checksum/size."""
    try:
        checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise BadSample("bad_tar", f"{where}: unparsable tar header") from None
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):
        raise BadSample("bad_tar", f"{where}: bad tar header checksum")
    raw_name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        raw_name = prefix + b"/" + raw_name
    name = raw_name.decode("utf-8", "backslashreplace")
    return name, size, header[156:157] in (b"0", b"\0")


def _member_name(name: str, regular: bool, where: str) -> tuple[str, str]:
    """(key, member) of a regular member with a safe name; BadSample otherwise."""
    try:
        key, member = check_member_name(name)
    except ValueError:
        raise BadSample("unsafe_member_name", f"{where}: unsafe tar member name {name!r}") from None
    if not regular:
        raise BadSample("unsafe_member_type", f"{where}: tar member {name!r} is not a regular file")
    return key, member


def parse_sample(data, key: str, where: str):
    """{member: bytes} of one sample's tar bytes (its USTAR headers + data, exactly its index range), or a
    BadSample naming the reason. .npy members come back as memoryviews of `data` (no copy); others as bytes."""
    view, members, p = memoryview(data), {}, 0
    try:
        while p < len(data):
            if p + 512 > len(data):
                raise BadSample(
                    "member_size_mismatch", f"{where}: {len(data) - p} index bytes left after the last member"
                )
            header = data[p : p + 512]
            if not any(header):
                reason = "index_mismatch" if p == 0 else "member_size_mismatch"
                raise BadSample(
                    reason, f"{where}: end-of-archive block at byte {p} of the sample's index range"
                )
            try:
                name, size, regular = _header_fields(header, f"{where}: member at byte {p}")
            except BadSample as bad:
                if p == 0:
                    raise BadSample("index_mismatch", f"{where}: no tar header at the index offset") from None
                raise bad from None
            k, member = _member_name(name, regular, where)
            if k != key:
                if p == 0:
                    raise BadSample("index_mismatch", f"{where}: the index offset holds member {name!r}")
                raise BadSample(
                    "member_size_mismatch", f"{where}: the index byte range runs into member {name!r}"
                )
            if p + 512 + size > len(data):
                raise BadSample(
                    "member_size_mismatch",
                    f"{where}: member {name!r} is {size} bytes, past the sample's index range "
                    f"({len(data)} bytes)",
                )
            body = view[p + 512 : p + 512 + size]
            members[member] = body if member.endswith(".npy") else bytes(body)
            p += 512 + -(-size // 512) * 512
    except BadSample as bad:
        return bad
    return members


class _Tar:
    """An open tar and, computed only when a read comes up short, its size and whether it ends properly."""

    def __init__(self, f, url: str):
        self.f, self.url = f, url
        self._size: int | None = None
        self._clean: bool | None = None

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = int(self.f.seek(0, 2))
        return self._size

    @property
    def ends_cleanly(self) -> bool:
        """True when the tar ends with end-of-archive zero blocks (so it was not cut short)."""
        if self._clean is None:
            size = self.size
            self._clean = False
            if size >= 1024 and size % 512 == 0:
                self.f.seek(size - 1024)
                tail = self.f.read(1024)
                self._clean = len(tail) == 1024 and not any(tail)
        return self._clean

    def read_range(self, key: str, offset: int, nbytes: int):
        """The bytes of one index range, or a BadSample (range invalid, too large, past the end, truncated)."""
        where = f"{self.url} sample {key!r}"
        if nbytes > MAX_SAMPLE_BYTES:
            return BadSample(
                "member_too_large",
                f"{where}: index bytes_total={nbytes} > MAX_SAMPLE_BYTES={MAX_SAMPLE_BYTES}; not read",
            )
        if offset < 0 or offset % 512 or nbytes < 512 or nbytes % 512:
            return BadSample(
                "offset_out_of_range",
                f"{where}: index offset {offset} / bytes_total {nbytes} is no tar range",
            )
        try:
            self.f.seek(offset)
            data = self.f.read(nbytes)
        except (OSError, ValueError) as exn:
            if offset >= self.size:
                data = b""
            else:
                return BadSample("bad_tar", f"{where}: {type(exn).__name__}: {exn}")
        if len(data) == nbytes:
            return data
        if self.ends_cleanly:
            return BadSample(
                "offset_out_of_range",
                f"{where}: index range [{offset}, {offset + nbytes}) lies past the end of the tar "
                f"({self.size} bytes)",
            )
        return BadSample(
            "truncated",
            f"{where}: the tar ends at byte {self.size} (cut short, no end-of-archive blocks), "
            f"before the end of the sample's range [{offset}, {offset + nbytes})",
        )

    def trailing_member(self, end: int):
        """A BadSample when a tar member lies after the last indexed sample (at `end`), else None."""
        try:
            self.f.seek(end)
            block = self.f.read(512)
        except (OSError, ValueError):
            return None
        if len(block) < 512 or not any(block):
            return None
        try:
            name = repr(_header_fields(block, self.url)[0])
        except BadSample:
            name = "(unparsable header)"
        return BadSample(
            "index_mismatch", f"{self.url}: tar member {name} at byte {end} is after the last indexed sample"
        )


def _iter_tar(f, url: str):
    """(name, is_regular, data) of each tar member in order, reading at most MAX_SAMPLE_BYTES per member;
    a damaged or truncated tar ends the stream with a BadSample (a too-large member yields one and is skipped)."""
    p = 0
    while True:
        header = f.read(512)
        if len(header) < 512:
            yield BadSample("truncated", f"{url}: the tar ends at byte {p + len(header)} without end blocks")
            return
        if not any(header):
            return
        try:
            name, size, regular = _header_fields(header, f"{url}: member at byte {p}")
        except BadSample as bad:
            yield bad
            return
        padded = -(-size // 512) * 512
        if size > MAX_SAMPLE_BYTES:
            yield BadSample(
                "member_too_large", f"{url}: member {name!r} is {size} bytes > MAX_SAMPLE_BYTES; not read"
            )
            f.seek(p + 512 + padded)
        else:
            data = f.read(size)
            if len(data) < size:
                yield BadSample("truncated", f"{url}: the tar ends inside member {name!r}")
                return
            f.read(padded - size)
            yield name, regular, data
        p += 512 + padded
