"""Download and unpack the public datasets (CIFAR-10, MVTec AD) with checks at every step.

Large archives come over flaky links, so a download goes to ``<dest>.part`` and resumes
from there with an HTTP ``Range`` request; only a complete file whose checksum matches is
renamed to its final name. Extraction is atomic and refuses archive members that would
land outside the target folder, so a bad or hostile archive never leaves files behind.
Standard library plus tqdm only, so fetching data needs none of the heavy dependencies.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from anomaly_models.errors import DataError, DownloadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where one dataset archive comes from and what it unpacks to.

    ``urls`` are tried in order, so a mirror can stand in when an official link moves
    (MVTec has rotated its share links several times). ``sha256``/``md5`` are None where
    no published checksum is known; such downloads are not verified.
    """

    filename: str
    urls: tuple[str, ...]
    extracts_to: tuple[str, ...]
    sha256: str | None = None
    md5: str | None = None


MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)

# CIFAR-10: URL and md5 from https://www.cs.toronto.edu/~kriz/cifar.html, the same values
# torchvision uses (torchvision/datasets/cifar.py, ``tgz_md5``).
_CIFAR10 = Source(
    filename="cifar-10-python.tar.gz",
    urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    extracts_to=("cifar-10-batches-py",),
    md5="c58f30108f718f92721af3b95e74349a",
)

# MVTec AD. MVTec rotates its mydrive.ch share links: the earlier official links
# (shares/38536/...f282/420938113-1629952094 and .../f283/420938113-1629960298) were
# reported dead in anomalib issues #3121 and #3608, so only the newest ones are listed,
# as found in rmateusc/stable-datasets (stable_datasets/images/mvtec_ad.py, _BUNDLE_URL
# and _CATEGORY_URLS). The full archive (5.26 GB) keeps its file id across the moves; its
# sha256 is anomalib's (src/anomalib/data/datamodules/image/mvtecad.py, DOWNLOAD_INFO).
# No public source publishes checksums of the per-category archives, so they are None.
_MVTEC_FULL = Source(
    filename="mvtec_anomaly_detection.tar.xz",
    urls=(
        "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
        "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
    ),
    extracts_to=MVTEC_CATEGORIES,
    sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
)

# category -> (share id/key, file id) of its archive https://www.mydrive.ch/shares/.../<category>.tar.xz
_MVTEC_CATEGORY_LINKS = {
    "bottle": ("150452/132a93367fb17cdf968dfb5c4013f6e7", "420937370-1629958698"),
    "cable": ("150453/10f960e07fec2838b2cd512586633a32", "420937413-1629958794"),
    "capsule": ("150454/e0ce6dd74eb150f46c0d98131b3703f2", "420937454-1629958872"),
    "carpet": ("150455/eac7fbce84d93a5094e13f391170eca4", "420937484-1629959013"),
    "grid": ("150456/bb0b2e3dc804ccb8b4485e01f8e4493b", "420937487-1629959044"),
    "hazelnut": ("150457/51d49f65e84bdc100ff8035d7dd783ea", "420937545-1629959162"),
    "leather": ("150458/923030ce14e10a7d147e95d0f8885f6b", "420937607-1629959262"),
    "metal_nut": ("150459/c68856a21dca589b0f8ff6d4ee0f18f4", "420937637-1629959294"),
    "pill": ("150460/d4f1c04da67034ccc8d8b5fa3e73f244", "420938129-1629960351"),
    "screw": ("150461/242f454cc6385e5693c4fd4b94567d1e", "420938130-1629960389"),
    "tile": ("150462/5479f0fdc97bc6fa16eab0cb0cf0109f", "420938133-1629960456"),
    "toothbrush": ("150463/895a1a5fb84b958f07417784b060434b", "420938134-1629960477"),
    "transistor": ("150464/99b8ea0332438d64fcc2475ee73f9c29", "420938166-1629960554"),
    "wood": ("150465/d5b4115b720cdb54d217e75636e6e374", "420938383-1629960649"),
    "zipper": ("150466/bd155b557520edaf692d9bfdb915c24a", "420938385-1629960680"),
}


def _mvtec_category(name: str) -> Source:
    share, file_id = _MVTEC_CATEGORY_LINKS[name]
    return Source(
        filename=f"{name}.tar.xz",
        urls=(f"https://www.mydrive.ch/shares/{share}/download/{file_id}/{name}.tar.xz",),
        extracts_to=(name,),
    )


# dataset name -> category (None: the whole dataset) -> source. Pass a table of the same
# shape as ``sources=`` to download_dataset to use mirrors (or a local test server).
SOURCES: dict[str, dict[str | None, Source]] = {
    "cifar10": {None: _CIFAR10},
    "mvtec": {None: _MVTEC_FULL, **{c: _mvtec_category(c) for c in MVTEC_CATEGORIES}},
}


def _digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _checksum_mismatch(path: Path, sha256: str | None, md5: str | None) -> tuple[str, str, str] | None:
    """Return (algorithm, expected, actual) for the first checksum that fails, else None."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            actual = _digest(path, algorithm)
            if actual != expected.lower():
                return algorithm, expected, actual
    return None


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "anomaly-models-downloader"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # Range Not Satisfiable: the .part file is unusable
            return _open(url, 0, timeout)
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"could not download {url}: {e.reason}") from None
    except (http.client.HTTPException, OSError) as e:
        raise DownloadError(f"could not download {url}: {e}") from None


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """First byte offset of a 206 answer (``Content-Range: bytes START-END/TOTAL``)."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _request_from(url: str, offset: int, timeout: float) -> tuple[http.client.HTTPResponse, int]:
    """Open ``url`` resuming at ``offset``; return the response and the offset it really starts at."""
    response = _open(url, offset, timeout)
    if offset and response.status == 206 and _range_start(response) != offset:
        response.close()
        response = _open(url, 0, timeout)
    if offset and response.status != 206:
        logger.warning("could not resume %s, downloading it again from the start", url)
        return response, 0
    return response, offset


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    chunk_size: int = 1 << 20,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming an earlier partial download and verifying checksums.

    The data goes to ``dest + ".part"`` first and is renamed to ``dest`` only once complete
    and verified, so ``dest`` never holds a truncated or corrupt file. An interrupted
    transfer keeps the ``.part`` file; calling again continues from where it stopped.
    Raises DownloadError naming the URL on network/HTTP errors and on checksum mismatch
    (the partial file is deleted then, since resuming it cannot help).
    """
    dest = Path(dest)
    if dest.exists():
        mismatch = _checksum_mismatch(dest, sha256, md5)
        if mismatch is None:
            logger.info("%s already present, skipping download", dest)
            return dest
        logger.warning("%s exists but its %s does not match, downloading it again", dest, mismatch[0])
        dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    response, offset = _request_from(url, offset, timeout)

    with response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        received = 0
        bar = tqdm(
            total=None if expected is None else offset + expected,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest.name,
            disable=None if progress else True,  # None: no bar when stderr is not a terminal (logs)
        )
        with bar, open(part, "ab" if offset else "wb") as out:
            try:
                while chunk := response.read(chunk_size):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as e:
                raise DownloadError(
                    f"download of {url} was interrupted after {offset + received} bytes ({e}); "
                    f"run again to resume from {part}"
                ) from None
    if expected is not None and received < expected:
        raise DownloadError(
            f"download of {url} was interrupted: connection closed after {offset + received} "
            f"of {offset + expected} bytes; run again to resume from {part}"
        )

    if sha256 is None and md5 is None:
        logger.warning("no checksum known for %s; %s could not be verified", url, dest)
    else:
        mismatch = _checksum_mismatch(part, sha256, md5)
        if mismatch is not None:
            part.unlink()
            algorithm, want, got = mismatch
            raise DownloadError(
                f"checksum mismatch for {url}: expected {algorithm} {want}, got {got}; "
                "the downloaded file was deleted"
            )
    os.replace(part, dest)
    return dest


def _strict_data_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, but refusing absolute names instead of silently stripping the "/"."""
    if member.name.startswith(("/", os.sep)) or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest_path)


def extract_archive(archive: str | os.PathLike, target_dir: str | os.PathLike) -> Path:
    """Unpack a tar archive (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) into ``target_dir``.

    Everything is unpacked into a temporary folder next to ``target_dir`` first, and the
    whole compressed stream is read to its end so its integrity check (gzip/xz CRC) runs.
    Only then are the top-level entries moved into ``target_dir`` with ``os.replace``;
    entries that already exist there are kept. Members with absolute paths, ``..`` or
    links escaping the folder are refused. On any failure the temporary folder is removed,
    so nothing half-extracted is left, and DownloadError names the archive and the member.
    """
    archive, target = Path(archive), Path(target_dir)
    if not archive.is_file():
        raise DownloadError(f"cannot extract {archive}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder must be on the same filesystem as the target for os.replace;
    # a mount point's parent is not, so then it goes inside the target instead.
    base = target if os.path.ismount(target) else target.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=base))
    where = "at its start"

    def checked(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
        nonlocal where
        where = f"at member {member.name!r}"
        return _strict_data_filter(member, dest_path)

    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter=checked)
                where = "in the integrity check after the last member"
                while tar.fileobj.read(1 << 20):  # read to the end so gzip/xz verify their CRC
                    pass
        except tarfile.FilterError as e:
            raise DownloadError(
                f"refusing to extract {archive}: unsafe member {e.tarinfo.name!r} ({e})"
            ) from None
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions: not the archive
                raise DownloadError(f"could not extract {archive} into {target} ({where}): {e}") from None
            raise DownloadError(
                f"could not extract {archive}: it is corrupt or truncated "
                f"(failed {where}: {e}); delete it to download it again"
            ) from None
        target.mkdir(exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            destination = target / entry.name
            if destination.exists():
                logger.warning("%s already exists, keeping it instead of the copy in %s", destination, archive)
                continue
            os.replace(entry, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch(source: Source, archive: Path) -> Path:
    """Try each URL of ``source`` in turn; raise DownloadError listing every failure."""
    failures = []
    for i, url in enumerate(source.urls):
        try:
            return download_file(url, archive, sha256=source.sha256, md5=source.md5)
        except DownloadError as e:
            failures.append(str(e))
            if i + 1 < len(source.urls):
                logger.warning("%s; trying the next source", e)
    raise DownloadError(f"could not download {source.filename} from any source: " + "; ".join(failures))


def download_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    category: str | None = None,
    sources: Mapping[str, Mapping[str | None, Source]] | None = None,
) -> Path:
    """Download and unpack dataset ``name`` ("cifar10" or "mvtec") into ``root``.

    For MVTec, ``category`` fetches one category's archive (into ``root/<category>``);
    None fetches the full archive with all 15 categories. Returns the dataset folder
    (``root/cifar-10-batches-py``, ``root/<category>``, or ``root`` for all of MVTec).
    Does nothing if that folder is already there; the archive is deleted once unpacked.
    ``sources`` replaces the built-in URL table (same shape as SOURCES).
    """
    table = SOURCES if sources is None else sources
    if name not in table:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(table))}")
    entries = table[name]
    if category not in entries:
        categories = sorted(c for c in entries if c is not None)
        if not categories:
            raise DataError(f"dataset {name!r} has no categories, but category={category!r} was given")
        whole = " (or no category for the whole dataset)" if None in entries else ""
        raise DataError(f"unknown {name} category {category!r}; allowed: {', '.join(categories)}{whole}")
    source = entries[category]

    root = Path(root)
    folders = [root / folder for folder in source.extracts_to]
    result = folders[0] if len(folders) == 1 else root
    if all(folder.is_dir() for folder in folders):
        logger.info("%s already present in %s, skipping download", name, root)
        return result

    archive = _fetch(source, root / source.filename)
    extract_archive(archive, root)
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise DataError(f"{archive} did not contain the expected folders: {', '.join(missing)}")
    archive.unlink()
    return result


def copy_dataset(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a dataset folder from a local mirror (a shared drive, ../shared/data) atomically.

    For teams and offline machines: the same layout as the official archive, no network.
    """
    source, target = Path(source), Path(target)
    if target.is_dir():
        logger.info("%s already present, skipping copy", target)
        return target
    if not source.is_dir():
        raise DataError(f"mirror folder not found: {source}")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        shutil.copytree(source, temp / "copy")
        os.replace(temp / "copy", target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def materialise_dataset(config, target: str | os.PathLike) -> Path:
    """Fill the project's own, DVC-tracked copy `target` (data/<dataset>) of what `config` reads.

    Every door (the flow, `dvc repro`, scheduled and retrain runs) reads this one folder, so they
    all see the same data version. It is copied from the configured source (data.root,
    $ANOMALY_DATA_DIR, ../shared/data) when that holds the data, else fetched from the official
    source. A folder already there is kept as it is: it may hold images added by retraining.
    """
    from anomaly_models.data import DATA_DIR_ENV, data_root

    target, kind = Path(target), config.kind
    if kind.is_present(target, config):
        return target
    sub = kind.subject_folder(config)
    try:
        source = data_root(config)
        looked = f"not in {source / sub}"
    except DataError as error:  # no data directory on this machine: the official download is the source
        source, looked = None, str(error)
    if source is not None and source.resolve() != target.resolve() and kind.is_present(source, config):
        copy_dataset(source / sub, target / sub)
        return target
    try:
        kind.fetch(target, config)
    except DownloadError as error:  # offline: say where a local copy would have been read from
        raise DownloadError(
            f"{error}; and no local copy ({looked}): set data.root or {DATA_DIR_ENV} to the folder "
            f"that holds the data (the bundled one: ../shared/data)"
        ) from None
    return target
