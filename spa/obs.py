"""Optimal Brain Surgeon for one layer, in numpy (float64).

A consumer layer computes Y = W X with W of shape (d_out, d_in) and inputs X (d_in, N); for a
Conv, d_in = C_in/group * prod(kernel) and the columns are grouped per input channel (im2col,
see `unfold`). The layer-wise loss of replacing W by W' is ||W X - W' X||^2 / N, whose Hessian
(shared by every row of W) is H = 2 X X^T / N (`HessianSum`). With Hinv = H^-1:

- removing the column set Q (one channel: its kh*kw columns, or one head: its head-dim columns)
  costs at least  dL = 1/2 tr(W[:,Q] (Hinv[Q,Q])^-1 W[:,Q]^T)   (`saliency`),
- which the best update of the remaining columns attains:
  dW = -W[:,Q] (Hinv[Q,Q])^-1 Hinv[Q,:]   (`compensate`; the exact least-squares solution),
- and Hinv of the remaining columns is Hinv - Hinv[:,Q] (Hinv[Q,Q])^-1 Hinv[Q,:] (`downdate`).

H is damped by `damp` x its mean diagonal before inversion (the exact formulas hold for the damped
H); a Hessian Cholesky cannot factor gets more damping until it does, so a rank-deficient or
singular H (dead channels, duplicated channels, fewer samples than columns) never gives NaN/Inf.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DEFAULT_DAMP = 0.01
FLUSH_ROWS = 2048  # HessianSum multiplies at least this many rows (or d_in) at once
SINGLE_ABOVE = 1024  # Cholesky factorisations of wider Hessians run in float32


def one_blas_thread(fn):
    """Run `fn` with BLAS/LAPACK on one thread. OpenBLAS's threaded Cholesky waits on every
    thread at each block step: on a 2-core machine with any other load it measured 20-60x
    slower than one thread (dpotrf of 2304 columns: 3.3 s vs 0.14 s; matrix products were as
    fast on one thread as on two under the same load)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas_on_one_thread():
            return fn(*args, **kwargs)
    return wrapper


_CONTROLLER = []


def blas_on_one_thread():
    """A context limiting BLAS to one thread. One ThreadpoolController for all of them:
    threadpool_limits() looks the libraries up again on every call (1.6 ms, 0.04 ms here)."""
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")


class HessianSum:
    """H = 2 X X^T / N accumulated batch by batch: memory is d_in^2, whatever N is. Each chunk's
    X X^T is one matrix product in the rows' precision (float32 activations: sgemm; OpenBLAS's syrk,
    half the arithmetic, ran 1.2-2.3x slower here, docs/obspa.md), summed in that precision too
    (the product's own rounding is the larger error; float64 sums doubled the memory of the largest
    stage: a 1.1B LLaMA's Hessians 6.3 GB). Fewer rows than `flush_rows` (at most d_in) wait for more
    before one product: a product over 192 rows ran at half the speed of one over 2048 (MiniLM's
    1536-wide MLP inputs, 192 rows a batch from 1024 sentences), and the rows waiting take at most
    the memory of H itself. `matrix` turns the sum into H in place (one d_in^2 array per layer, not
    a sum and its H); a later `add` turns it back."""

    def __init__(self, columns: int, blocks: int = 1):
        self.shape = (blocks, columns, columns)
        self.xtx = None  # allocated by the first `add`, in its rows' precision
        self.count = 0
        self.symmetric = True
        self.normalised = False  # xtx holds H (symmetrised and divided by N), not the sum
        self.flush_rows = min(FLUSH_ROWS, columns)
        self.waiting = [[] for _ in range(blocks)]  # per block: (rows, other rows or None) not yet multiplied

    def add(self, rows: np.ndarray, block: int = 0, count: bool = True, chunk: int = 8192, other=None):
        """rows: (n, d_in), one input vector per row; other: rows of a second input (X_ref) to
        sum the cross term 2 X X_ref^T / N instead."""
        dtype = np.float32 if rows.dtype == np.float32 else np.float64
        if self.xtx is None:
            self.xtx = np.zeros(self.shape, dtype)
        if self.normalised:
            self.xtx *= max(self.count, 1) / 2.0
            self.normalised = False
        self.symmetric = self.symmetric and other is None
        if count:
            self.count += len(rows)
        waiting = self.waiting[block]
        if len(rows) < self.flush_rows:  # a copy: a view would keep its whole batch tensor alive
            waiting.append((np.array(rows, dtype=dtype), None if other is None else np.array(other, dtype=dtype)))
            if sum(len(part) for part, _ in waiting) >= self.flush_rows:
                self._flush(block)
            return
        self._flush(block)
        self._multiply(rows, block, chunk, other)

    def _multiply(self, rows, block, chunk=8192, other=None):
        dtype = self.xtx.dtype
        for start in range(0, len(rows), chunk):
            part = np.asarray(rows[start:start + chunk], dtype=dtype)
            right = part if other is None else np.asarray(other[start:start + chunk], dtype=dtype)
            self.xtx[block] += part.T @ right

    def _flush(self, block: int) -> None:
        waiting = self.waiting[block]
        if waiting:
            rows = np.concatenate([part for part, _ in waiting])
            other = None if waiting[0][1] is None else np.concatenate([right for _, right in waiting])
            waiting.clear()
            self._multiply(rows, block, other=other)

    @property
    def matrix(self) -> np.ndarray:
        """(blocks, d_in, d_in)."""
        if self.xtx is None:
            self.xtx = np.zeros(self.shape)
        for block in range(self.shape[0]):
            self._flush(block)
        if not self.normalised:
            if self.symmetric:  # the product's rounding may differ a little between H[i, j] and H[j, i]
                for block in self.xtx:
                    block += block.T  # numpy buffers the overlapping transpose: one block's copy at a time
                self.xtx *= 1.0 / max(self.count, 1)
            else:
                self.xtx *= 2.0 / max(self.count, 1)
            self.normalised = True
        return self.xtx


def damped(H: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    return damped_block(H, None, damp)


def damped_block(H: np.ndarray, K, damp: float = DEFAULT_DAMP, dtype=np.float64) -> np.ndarray:
    """damped(H)[K, K] (K None: all of it) without forming damped(H): the damping's scale is the
    mean of H's whole diagonal. H must be symmetric (HessianSum's is): one copy of the block is
    made, in `dtype`, and non-finite entries become 0."""
    block = _finite_block(H, K, dtype)
    block[np.diag_indices_from(block)] += _damping(H, K, damp)
    return block


def _finite_block(H: np.ndarray, K, dtype) -> np.ndarray:
    """A copy of H[K, K] (K None: all of it) in `dtype`, non-finite entries 0."""
    block = np.array(H if K is None else H[np.ix_(K, K)], dtype=dtype)
    if not np.isfinite(block).all():
        np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return block


def _damping(H: np.ndarray, K, damp: float) -> np.ndarray:
    """What damped_block adds to the diagonal of H[K, K]."""
    diag = np.diag(H)
    diag = np.where(np.isfinite(diag), diag, 0.0)
    scale = float(np.mean(diag)) if len(diag) and np.mean(diag) > 0 else 1.0
    # a dead column (zero diagonal) would otherwise be left with only the tiny global damping
    return damp * scale + ((diag if K is None else diag[K]) <= 0) * scale * 1e-2


def _cholesky(d: int):
    """(potrf, dtype): float32 above SINGLE_ABOVE columns (twice as fast, and so is the triangular
    inverse; the damping keeps the condition number low enough), float64 below. (OpenBLAS's
    float32 potri is slower than its float64 one: `inverse` stays float64.)"""
    from scipy.linalg import lapack

    return (lapack.spotrf, np.float32) if d > SINGLE_ABOVE else (lapack.dpotrf, np.float64)


@one_blas_thread
def inverse(H: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Inverse of the damped H; more damping until Cholesky succeeds (never NaN/Inf)."""
    d = len(H)
    if d == 0:
        return np.zeros((0, 0))
    from scipy.linalg import lapack

    damp = max(damp, 1e-10)
    for _ in range(12):
        factor, info = lapack.dpotrf(damped(H, damp), lower=False)  # Cholesky, then its inverse
        if info == 0:
            upper, info = lapack.dpotri(factor, lower=False)
            if info == 0:
                Hinv = np.triu(upper)
                Hinv += np.triu(upper, 1).T
                if np.all(np.isfinite(Hinv)):
                    return Hinv
        damp *= 10
    return np.eye(d) / max(float(np.mean(np.abs(np.diag(H)))), 1.0)


def _block_inverse(block: np.ndarray) -> np.ndarray:
    """(Hinv[Q,Q])^-1 for a (possibly stacked) symmetric positive block."""
    try:
        return np.linalg.inv(block)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(block, hermitian=True)


def upper_inverse_factor(H: np.ndarray, damp: float) -> np.ndarray:
    """U with H_damped^-1 = U^T U (upper Cholesky factor of the inverse)."""
    Hinv = inverse(H, damp)
    try:
        return np.linalg.cholesky(Hinv).T
    except np.linalg.LinAlgError:
        return np.diag(np.sqrt(np.maximum(np.diag(Hinv), 1e-12)))


GRID_BLOCK = 128  # columns rounded between two updates of the columns after them (on_grid)


def on_grid(W: np.ndarray, H: np.ndarray, scale: np.ndarray, zero: np.ndarray, low: int, high: int,
            damp: float = DEFAULT_DAMP, zeros: np.ndarray | None = None) -> np.ndarray:
    """W (rows x columns, float) rounded onto an integer grid, (clip(round(W / scale) + zero) - zero)
    * scale with scale and zero one per row (or one for all, or one per weight: W's shape), column
    by column, each column's rounding error spread over the columns after it through H's inverse
    (GPTQ, Frantar et al. 2022): what an OBS update of an integer weight is written back as. H: the
    columns' Hessian. `zeros` (W's shape, bool): weights held at exactly 0 (a sparsity pattern's),
    whatever the errors spread onto them."""
    W = np.array(W, dtype=np.float64)
    held = None if zeros is None else np.asarray(zeros, dtype=bool)

    def per_weight(p):
        p = np.asarray(p, np.float64)
        return np.broadcast_to(p if p.shape == W.shape else p.reshape(-1, 1), W.shape)

    scale, zero = per_weight(scale), per_weight(zero)
    U = upper_inverse_factor(H, damp)
    columns = W.shape[1]
    for start in range(0, columns, GRID_BLOCK):  # GPTQ's lazy batches: the columns after a block take
        end = min(start + GRID_BLOCK, columns)   # its errors in one product, not one outer product a column
        errors = np.empty((W.shape[0], end - start))
        for j in range(start, end):
            rounded = (np.clip(np.rint(W[:, j] / scale[:, j]) + zero[:, j], low, high) - zero[:, j]) * scale[:, j]
            if held is not None:
                rounded = np.where(held[:, j], 0.0, rounded)
            errors[:, j - start] = (W[:, j] - rounded) / U[j, j]
            W[:, j + 1:end] -= np.outer(errors[:, j - start], U[j, j + 1:end])
            W[:, j] = rounded
        W[:, end:] -= errors @ U[start:end, end:]
    return W


def identity_blocks(Q: np.ndarray) -> np.ndarray:
    """The diagonal blocks of H = I (calibration "none") for column sets Q (m, size), as `inverse_blocks` gives."""
    return np.broadcast_to(np.eye(Q.shape[1]), (len(Q), Q.shape[1], Q.shape[1]))


@one_blas_thread
def inverse_blocks(H: np.ndarray, damp: float = DEFAULT_DAMP):
    """A function Q (m, size) -> the diagonal blocks Hinv[Q, Q] (m, size, size) of the damped H's
    inverse, without forming the inverse: with Hd = U^T U (Cholesky), Hinv = V V^T for V = U^-1,
    so a block is V[Q] V[Q]^T (a Cholesky and a triangular inverse: about 2/3 of the work of the
    full inverse). Falls back to `inverse` when the factorisation fails."""
    from scipy.linalg import lapack

    potrf, dtype = _cholesky(len(H))
    trtri = lapack.strtri if dtype == np.float32 else lapack.dtrtri
    damp = max(damp, 1e-10)
    for _ in range(12):
        factor, info = potrf(damped_block(H, None, damp, dtype), lower=False, overwrite_a=True)
        if info == 0:
            V, info = trtri(factor, lower=False, overwrite_c=True)
            if info == 0 and np.all(np.isfinite(V)):  # upper triangular: potrf's clean=1 zeroed the rest
                return lambda Q: (lambda rows: (rows @ np.swapaxes(rows, 1, 2)).astype(np.float64))(V[Q])
        damp *= 10
    Hinv = inverse(H, damp)
    return lambda Q: Hinv[Q[:, :, None], Q[:, None, :]]


@one_blas_thread
def saliency(W: np.ndarray, Hinv, column_sets) -> np.ndarray:
    """dL of removing each column set on its own: 1/2 tr(W_Q (Hinv_QQ)^-1 W_Q^T). `Hinv`: the
    inverse, or a function giving its diagonal blocks (`inverse_blocks`)."""
    W = np.asarray(W, dtype=np.float64)
    blocks_of = Hinv if callable(Hinv) else (lambda Q: Hinv[Q[:, :, None], Q[:, None, :]])
    out = np.zeros(len(column_sets))
    by_size: dict = {}
    for k, q in enumerate(column_sets):
        by_size.setdefault(len(q), []).append(k)
    for size, ks in by_size.items():
        if size == 0:
            continue
        Q = np.array([column_sets[k] for k in ks], dtype=np.int64)  # (m, size)
        blocks = blocks_of(Q)  # (m, size, size)
        WQ = np.transpose(W[:, Q], (1, 0, 2))  # (m, d_out, size)
        solved = _block_inverse(blocks) @ np.transpose(WQ, (0, 2, 1))  # (m, size, d_out)
        out[ks] = 0.5 * np.einsum("mos,mso->m", WQ, solved)
    return np.maximum(out, 0.0)


@one_blas_thread
def compensate(W: np.ndarray, Hinv: np.ndarray, Q) -> np.ndarray:
    """W with the columns Q removed (zeroed) and the rest updated: the exact least-squares
    minimiser of ||W X - W' X||^2 under the damped H, all of Q at once."""
    W = np.asarray(W, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.int64)
    if len(Q) == 0:
        return W.copy()
    new = W - W[:, Q] @ _block_inverse(Hinv[np.ix_(Q, Q)]) @ Hinv[Q, :]
    new[:, Q] = 0.0
    return new


@one_blas_thread
def downdate(Hinv: np.ndarray, Q) -> np.ndarray:
    """Hinv of the remaining columns after removing Q (rows/columns Q become zero)."""
    Q = np.asarray(Q, dtype=np.int64)
    if len(Q) == 0:
        return Hinv.copy()
    new = Hinv - Hinv[:, Q] @ _block_inverse(Hinv[np.ix_(Q, Q)]) @ Hinv[Q, :]
    new[Q, :] = 0.0
    new[:, Q] = 0.0
    return new


def prune_columns(W: np.ndarray, H: np.ndarray, Q, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Remove columns Q of W and compensate the others, from the Hessian H (not its inverse).
    A column that is never in Q (e.g. a bias input of constant ones) takes part in the
    compensation like any kept column. A non-finite result falls back to plain removal."""
    new = refit(W, H, None, Q, damp)
    if not np.all(np.isfinite(new)):
        new = np.array(W, dtype=np.float64)
        new[:, np.asarray(Q, dtype=np.int64)] = 0.0
    return new


def refit(W: np.ndarray, H: np.ndarray, cross: np.ndarray | None, Q, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Columns Q removed, the others re-fitted to the *reference* outputs: the minimiser of
    ||W X_ref - W' X||^2 + lambda ||W'_K - W_K||^2 over the kept columns K, where X are the inputs
    the layer now sees (upstream already pruned), H = 2 X X^T / N and cross = 2 X X_ref^T / N.
    lambda is the damping of H. cross None (X == X_ref) is `compensate` exactly, computed as
    W_K + W_Q Hd[Q,K] Hd[K,K]^-1: one Cholesky of the kept block instead of a full inverse."""
    return next(refits(W, H, cross, Q, (damp,)))


def refits(W: np.ndarray, H: np.ndarray, cross: np.ndarray | None, Q, damps):
    """`refit` at each damping of `damps`, lazily (a caller that stops early saves the rest), the
    kept block of H copied once for all of them."""
    with blas_on_one_thread():  # not held while the caller works between steps
        problem = _Refit(W, H, cross, Q)
    for damp in damps:
        with blas_on_one_thread():
            fit = problem.at(damp)
        yield fit


class _Refit:
    """One layer's refit: the kept block of H (copied once; each damping only changes its
    diagonal) and the right-hand side, factorised per damping by `at`."""

    def __init__(self, W, H, cross, Q):
        self.W = np.asarray(W, dtype=np.float64)
        self.H = H
        self.Q = np.asarray(Q, dtype=np.int64)
        self.K = np.setdiff1d(np.arange(self.W.shape[1]), self.Q)
        self.potrf, self.dtype = _cholesky(len(self.K))
        self.block = _finite_block(H, self.K, self.dtype)
        self.plain = np.diag(self.block).copy()
        self.rhs = self.cross = None
        if cross is None:  # W Hd[:, K] = W_K Hd[K, K] + W_Q H[Q, K]: only the second term is solved for
            # in the solve's precision: a float32 product is 1.9x faster (a 1.1B LLaMA's down_proj: 0.55 -> 0.29 s)
            HQK = np.nan_to_num(np.asarray(H[np.ix_(self.Q, self.K)], dtype=self.dtype), posinf=0.0, neginf=0.0)
            self.rhs = (self.W[:, self.Q].astype(self.dtype) @ HQK).T
        else:
            self.cross = np.asarray(cross, dtype=np.float64)[self.K, :]

    def at(self, damp: float) -> np.ndarray:
        from scipy.linalg import cho_solve

        W, K = self.W, self.K
        for _ in range(12):
            added = _damping(self.H, K, damp)
            self.block[np.diag_indices_from(self.block)] = self.plain + added
            factor, info = self.potrf(self.block, lower=False)
            if info == 0:
                break
            damp = max(damp, 1e-10) * 10
        else:
            new = W.copy()
            new[:, self.Q] = 0.0
            return new
        new = np.zeros_like(W)
        if self.cross is None:
            new[:, K] = W[:, K] + cho_solve((factor, False), self.rhs).T
        else:
            pulled = self.cross.copy()
            pulled[np.arange(len(K)), K] += added  # the damping pulls towards W_K
            new[:, K] = cho_solve((factor, False), (W @ pulled.T).T.astype(self.dtype)).T
        return new


@one_blas_thread
def rescale(W: np.ndarray, H: np.ndarray, Q, channels: np.ndarray, bias: bool, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Columns Q removed; every kept input channel rescaled by one factor (and the bias column, if
    `bias`, shifted by the removed/rescaled inputs' mean): the least-squares minimiser of
    ||W X - W' X||^2 over W' = W diag(s) (+ a bias shift), with as many unknowns as input channels
    instead of one per weight (mask rescaling, Kwon et al. 2022). `channels`: the channel of each
    column (the bias column, last when `bias`, excluded)."""
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64) / 2.0  # E[x x^T]
    d = W.shape[1] - bool(bias)
    A = W[:, :d]
    if bias:
        mu = H[:d, d]
        C = H[:d, :d] - np.outer(mu, mu)
    else:
        C = H[:d, :d]
    G = (A.T @ A) * C  # E||A diag(r) x||^2 = r^T G r
    count = int(channels.max()) + 1
    P = np.zeros((d, count))
    P[np.arange(d), channels] = 1.0
    Gc = P.T @ G @ P
    lost = np.zeros(count)
    removed = np.unique(channels[np.asarray(Q, dtype=np.int64)]) if len(Q) else np.zeros(0, dtype=np.int64)
    lost[removed] = 1.0
    kept = np.setdiff1d(np.arange(count), removed)
    if len(kept) and len(removed):
        block = Gc[np.ix_(kept, kept)]
        block = block + np.eye(len(kept)) * damp * max(float(np.mean(np.diag(block))), 1e-30)
        lost[kept] = -np.linalg.solve(block, Gc[np.ix_(kept, removed)] @ lost[removed])
    r = P @ lost  # per column: the fraction of the input that is lost (1 for removed)
    new = W.copy()
    new[:, :d] = A * (1.0 - r)
    if bias:
        new[:, d] += A @ (r * mu)
    return new


def lower_factor(H: np.ndarray) -> np.ndarray | None:
    """L (float32, lower triangular, Fortran order) with H = L L^T, factorised in float64; None
    where H is not positive definite (a dead input column)."""
    from scipy.linalg import lapack

    if not np.isfinite(H).all():
        return None
    with blas_on_one_thread():
        L, info = lapack.dpotrf(np.asarray(H, dtype=np.float64), lower=True, clean=True)
    return np.asfortranarray(L, dtype=np.float32) if info == 0 else None


def factored_error(W: np.ndarray, W_new: np.ndarray, L: np.ndarray) -> float:
    """`layer_error` from H's factor L: 1/2 ||(W - W') L||^2, a triangular product (trmm) instead of a full one."""
    from scipy.linalg import blas

    product = blas.strmm(1.0, L, _change(W, W_new), side=1, lower=1)  # (W - W') @ L
    return float(0.5 * np.sum(np.square(product), dtype=np.float64))


def _change(W: np.ndarray, W_new: np.ndarray) -> np.ndarray:
    """W - W' in float32, subtracted in float64 (the two are close: their difference, not their rounding)."""
    return (np.asarray(W, dtype=np.float64) - np.asarray(W_new, dtype=np.float64)).astype(np.float32)


def layer_error(W: np.ndarray, W_new: np.ndarray, H: np.ndarray) -> float:
    """||W X - W' X||^2 / N from H = 2 X X^T / N (in float32: it ranks candidate updates)."""
    D = _change(W, W_new)
    return float(0.5 * np.sum((D @ np.asarray(H, dtype=np.float32)) * D, dtype=np.float64))


def reference_error(W: np.ndarray, H: np.ndarray, cross: np.ndarray):
    """W_new -> ||W X_ref - W_new X||^2 / N less the same for W_new = W, from H = 2 X X^T / N and
    cross = 2 X X_ref^T / N (X: the inputs the layer now sees, X_ref: the original model's): ranks
    updates fitted to the original outputs. Written in D = W_new - W, so that it is as small as the
    error itself: 1/2 D H D^T + D (H - cross) W^T, the second factor computed once."""
    H32 = np.asarray(H, dtype=np.float32)
    pulled = (np.asarray(W, dtype=np.float64) @ (np.asarray(H, dtype=np.float64) - cross).T).astype(np.float32)

    def error(W_new: np.ndarray) -> float:
        D = -_change(W, W_new)
        return float(0.5 * np.sum((D @ H32) * D, dtype=np.float64) + np.sum(D * pulled, dtype=np.float64))

    return error


# ---------------------------------------------------------------------------------------------
# Conv inputs as matrix rows (im2col)
# ---------------------------------------------------------------------------------------------
def conv_pads(spatial, kernel, strides, dilations, pads=None, auto_pad="NOTSET"):
    """Begin/end pads (ONNX layout [b1, b2, ..., e1, e2, ...]) including auto_pad."""
    nd = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID" or not pads:
        return [0] * (2 * nd)
    return list(pads)


def _geometry(spatial, kernel, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    nd = len(kernel)
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    pads = conv_pads(spatial, kernel, strides, dilations, pads, auto_pad)
    window = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    out = [(size + pads[i] + pads[i + nd] - w) // s + 1
           for i, (size, w, s) in enumerate(zip(spatial, window, strides))]
    return strides, dilations, pads, out


def conv_output_shape(shape, kernel, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    """[N, *output spatial] of a Conv on an input of `shape` [N, C, *spatial]."""
    return [shape[0]] + _geometry(shape[2:], kernel, strides, pads, dilations, auto_pad)[3]


def unfold(x: np.ndarray, kernel, strides=None, pads=None, dilations=None, auto_pad="NOTSET",
           rows: np.ndarray | None = None) -> np.ndarray:
    """Conv input [N, C, *spatial] -> rows [N * prod(out), C * prod(kernel)], columns channel-major
    (column c * prod(kernel) + kernel offset), matching a weight reshaped to [C_out, -1].
    `rows`: only these rows (flat indices over N x output positions), gathered without unfolding
    the rest."""
    nd = len(kernel)
    strides, dilations, pads, out = _geometry(x.shape[2:], kernel, strides, pads, dilations, auto_pad)
    if all(k == 1 for k in kernel) and not any(pads):  # pointwise: the strided input, channels last
        picked = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
        flat = np.moveaxis(picked, 1, -1).reshape(-1, x.shape[1])
        return flat if rows is None else flat[np.asarray(rows, dtype=np.int64)]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    if rows is not None:  # the corner of each chosen window, then the kernel offsets
        where = np.unravel_index(np.asarray(rows, dtype=np.int64), [x.shape[0]] + out)
        offsets = np.stack(np.meshgrid(*[np.arange(k) * d for k, d in zip(kernel, dilations)], indexing="ij"),
                           axis=-1).reshape(-1, nd)  # (prod(kernel), nd)
        corners = np.stack([where[1 + i] * strides[i] for i in range(nd)], axis=-1)  # (n, nd)
        position = corners[:, None, :] + offsets[None]  # (n, prod(kernel), nd)
        channels_last = np.moveaxis(padded, 1, -1)  # whole channel vectors per gathered position
        index = (where[0][:, None],) + tuple(position[:, :, i] for i in range(nd))
        return np.swapaxes(channels_last[index], 1, 2).reshape(len(where[0]), -1)  # n, C, prod(kernel)
    window = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    views = sliding_window_view(padded, window, axis=tuple(range(2, 2 + nd)))  # N, C, *pos, *win
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    patches = views[index]  # N, C, *out, *kernel
    order = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    patches = np.transpose(patches, order)  # N, *out, C, *kernel
    n_rows = int(np.prod(patches.shape[:1 + nd]))
    return patches.reshape(n_rows, -1)
