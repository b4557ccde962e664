"""Each image's nearest neighbours by cosine, in two spaces: the codes centred on the train mean (duplicates) and
the raw codes (outliers, as cleanlab's `OutOfDistribution` scores features). Either every pair is scanned by a
blocked matmul on the codes' device (exact; one product gives both spaces), or a faiss IVF index over
PCA-reduced codes proposes candidates that are rescored on the full codes.

Images -> (centred, raw) `Neighbours`: (N, k) indices of the k most similar *other* images and their cosines,
most similar first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import CnnCodesError
from .config import EXACT_UP_TO
from .images import Images

SCORE_BYTES = 256 << 20  # one block of the (queries x N) score matrices
FAISS_DIM = 128  # faiss: PCA to this many dimensions (the IVF scan costs ~D per candidate)
FAISS_NPROBE = 16  # faiss: inverted lists visited per query
FAISS_CANDIDATES = 3  # faiss: k x this many candidates per image are rescored on the full codes
FAISS_BLOCK = 65536  # faiss: rows added or searched at once
PCA_SAMPLE = 10_000  # faiss: codes the PCA is fitted on (their covariance)


@dataclass
class Neighbours:
    """(N, k) neighbour indices and cosines (most similar first; -1 / -inf where fewer than k exist)."""

    index: np.ndarray
    similarity: np.ndarray
    method: str = "exact"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def find_neighbours(images: Images, k: int, search: str = "auto", device: str = "auto") -> tuple[Neighbours, Neighbours]:
    """The k nearest other images of each, by centred and by raw cosine: `search` exact, faiss, or auto
    (exact up to EXACT_UP_TO codes, then faiss if installed)."""
    from ..runtime import resolve_device

    n = len(images)
    k = max(0, min(k, n - 1))
    start = time.perf_counter()
    method, notes = _choose(search, n)
    if k == 0:
        empty = (np.full((n, 0), -1, np.int64), np.zeros((n, 0), np.float32))
        centred, raw = empty, empty
    elif method == "faiss":
        centred, raw = faiss_neighbours(images, k), faiss_neighbours(images, k, raw=True)
        method = f"faiss (IVF over codes PCA-reduced to {FAISS_DIM}-d, nprobe {FAISS_NPROBE}, rescored exactly)"
    else:
        dev = resolve_device(device)
        centred, raw = exact_neighbours(images, k, dev)
        method = f"exact (blocked matmul on {dev})"
    seconds = time.perf_counter() - start
    return (Neighbours(*centred, method, seconds, notes), Neighbours(*raw, method, seconds, notes))


def _choose(search: str, n: int) -> tuple[str, list[str]]:
    """Which search runs, and a note when auto must scan more than EXACT_UP_TO codes without faiss."""
    if search == "exact" or (search == "auto" and n <= EXACT_UP_TO):
        return "exact", []
    if _has_faiss():
        return "faiss", []
    if search == "faiss":
        raise CnnCodesError("--search faiss needs faiss: pip install faiss-cpu (or faiss-gpu), or use --search exact")
    return "exact", [f"{n:,} codes and faiss is not installed: every pair scanned (time grows as N^2); "
                     f"pip install faiss-cpu for the index"]


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class RawCosine:
    """The raw codes' cosines from the centred ones: raw_i = l_i z_i + m, so raw_i . raw_j = l_i l_j c_ij + l_i a_i +
    l_j a_j + m.m (a_i = z_i . m), over |raw_i| |raw_j|; numpy arrays or torch tensors alike."""

    def __init__(self, images: Images, to=np.asarray):
        length = images.length.astype(np.float32)
        la = length * (images.codes @ images.mean)
        mm = float(images.mean.astype(np.float64) @ images.mean)
        self.length, self.la, self.mm = to(length), to(la.astype(np.float32)), mm
        self.norm = to(np.sqrt(np.maximum(length.astype(np.float64) ** 2 + 2 * la + mm, 1e-24)).astype(np.float32))

    def __call__(self, c, i, j):
        """c[q, m]: centred cosines of the images i[q] and j[q, m] (j 1-d: the same for every row) -> raw cosines."""
        j2 = j if j.ndim == 2 else j[None, :]
        raw = self.length[i][:, None] * self.length[j2]  # in place from here: one (rows, m) temporary at a time
        raw *= c
        raw += self.la[i][:, None]
        raw += self.la[j2]
        raw += self.mm
        raw /= self.norm[i][:, None] * self.norm[j2]
        return raw


def exact_neighbours(images: Images, k: int, device) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Every pair's centred cosine, a block of queries at a time (memory: the codes + ~2 x SCORE_BYTES), and from it
    the raw cosine (`RawCosine`); the top k of each."""
    import torch

    n = len(images)
    z = torch.from_numpy(np.ascontiguousarray(images.codes, dtype=np.float32)).to(device)
    raw_of = RawCosine(images, lambda a: torch.from_numpy(a).to(device))
    everyone = torch.arange(n, device=z.device)
    rows = max(1, min(n, SCORE_BYTES // (8 * n)))  # two (rows, n) float32 matrices
    out = [(np.empty((n, k), np.int64), np.empty((n, k), np.float32)) for _ in range(2)]
    with torch.no_grad():
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            c = z[lo:hi] @ z.T
            raw = raw_of(c, everyone[lo:hi], everyone)
            diagonal = (torch.arange(hi - lo, device=c.device), everyone[lo:hi])
            for (idx, sim), s in zip(out, (c, raw)):
                s[diagonal] = -torch.inf  # not itself
                v, i = torch.topk(s, k, dim=1)
                idx[lo:hi], sim[lo:hi] = i.cpu().numpy(), v.cpu().numpy()
    return out[0], out[1]


def faiss_neighbours(images: Images, k: int, raw: bool = False, nprobe: int = FAISS_NPROBE) -> tuple[np.ndarray, np.ndarray]:
    """An IVF index (inner product) over the unit codes (`raw`: the raw codes, else the centred ones) PCA-reduced
    to FAISS_DIM dimensions finds k x FAISS_CANDIDATES candidates per image; their exact cosines on the full codes
    decide the k kept. Memory beyond the codes: the reduced copy (n x FAISS_DIM floats) and a block of candidates."""
    import faiss

    from ..runtime import available_cores

    faiss.omp_set_num_threads(available_cores())
    n, d = images.codes.shape
    vectors = images.raw_unit if raw else (lambda r: images.codes[r])
    rng = np.random.default_rng(0)
    nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))  # faiss wants >= 39 training points per list
    sample = vectors(np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False)))
    pca = pca_basis(sample[:PCA_SAMPLE], FAISS_DIM) if d > FAISS_DIM else None

    def reduced(rows) -> np.ndarray:
        x = np.ascontiguousarray(vectors(rows), dtype=np.float32)
        return _unit((x - pca[0]) @ pca[1] if pca is not None else x)

    dim = FAISS_DIM if pca is not None else d
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(_unit((sample - pca[0]) @ pca[1]) if pca is not None else _unit(sample))
    for lo in range(0, n, FAISS_BLOCK):
        index.add(reduced(slice(lo, min(lo + FAISS_BLOCK, n))))
    index.nprobe = min(nprobe, nlist)
    m = min(n, k * FAISS_CANDIDATES + 1)
    idx, sim = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    raw_of = RawCosine(images) if raw else None
    step = max(1, SCORE_BYTES // (4 * m * d))  # queries whose candidates' codes are gathered at once
    for lo in range(0, n, FAISS_BLOCK):
        _, cand = index.search(reduced(slice(lo, min(lo + FAISS_BLOCK, n))), m)
        for a in range(0, len(cand), step):
            rows = np.arange(lo + a, lo + min(a + step, len(cand)))
            idx[rows], sim[rows] = rescore(images.codes, rows, cand[a:a + step], k, raw_of)
    return idx, sim


def pca_basis(sample: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean (D,) and top `dim` principal directions (D, dim) of `sample`: its covariance (one matmul), then
    that matrix's leading eigenvectors by randomized subspace iteration (`torch.svd_lowrank`, ~1 s). A full
    eigendecomposition of 2048 x 2048 (faiss's PCAMatrix, numpy's eigh, scikit-learn's PCA) took 10-40 s here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK on 2 busy cores: a 2048 x 144 QR took 1.2 s threaded, 8 ms on one thread
    try:
        x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
        mean = x.mean(0)
        x = x - mean
        u, _, _ = torch.svd_lowrank(x.T @ x / len(x), q=dim + 16, niter=4)
    finally:
        torch.set_num_threads(threads)
    return mean.numpy(), np.ascontiguousarray(u[:, :dim].numpy())


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def rescore(codes: np.ndarray, rows: np.ndarray, cand: np.ndarray, k: int,
            raw_of: RawCosine | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' exact cosines with their queries `rows` (centred, or raw through `raw_of`); the query itself
    and missing (-1) candidates dropped; the top k, most similar first."""
    safe = np.maximum(cand, 0)
    sims = np.einsum("nd,nmd->nm", codes[rows], codes[safe])
    if raw_of is not None:
        sims = raw_of(sims, rows, safe)
    sims[(cand < 0) | (cand == rows[:, None])] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    idx, sim = np.take_along_axis(cand, order, 1), np.take_along_axis(sims, order, 1)
    idx[~np.isfinite(sim)] = -1
    return idx, sim.astype(np.float32)
