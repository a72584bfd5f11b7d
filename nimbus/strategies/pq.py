"""Product quantization (PQ, Bolt-style 16 centroids per subspace, 8-bit LUT)."""
from __future__ import annotations

import numpy as np

from ..arrays import kernels, validate
from .._progress import progress_bar
from ._kmeans import kmeans
from ._clip import winsorize
from ._lut import NBUCKETS
from .base import Strategy, subspace_starts


class PQ(Strategy):
    """Product quantization: per-subspace k-means with K=16, nearest-centroid encode.

    Parameters
    ----------
    ncodebooks : int, C (1 <= C <= D)
    max_iter : int, Lloyd iterations per subspace
    clip : float in [0, 0.49], learn centroids from rows clipped per column to their
        clip and 1 - clip quantiles (heavy tails cannot claim a centroid; 0: off)
    quantize : bool, 8-bit LUT (one offset per codebook, one shared scale)
    random_state : None, int or RandomState; seeds k-means++ (resolved in ``fit``)
    verbose : bool, progress bar over codebooks

    Learned attributes
    ------------------
    starts_ : (C+1,) int64 subspace boundaries
    centroids_ : (C, 16, W) float32, zero-padded past each subspace's width W_c
    lut_ : (C, 16, M) float32; lut_q_, lut_scale_, lut_bias_ when quantized
    """

    name = "pq"

    def __init__(self, ncodebooks=16, *, max_iter=25, clip=1e-3, quantize=True,
                 random_state=None,
                 verbose=False):
        super().__init__(ncodebooks, quantize=quantize, random_state=random_state)
        self.max_iter = max_iter
        self.clip = clip
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        validate.check_int(self.max_iter, "max_iter", lo=1)
        validate.check_float(self.clip, "clip", 0.0, 0.49)

    def _fit(self, A, rng, B):
        from ..arrays import backend
        xp = backend.namespace(A)
        A = winsorize(A, self.clip)
        C = self.ncodebooks
        starts = subspace_starts(A.shape[1], C)
        W = int(np.max(np.diff(starts)))
        cent = xp.zeros((C, NBUCKETS, W), dtype=np.float32)
        with progress_bar(C, "pq k-means", self.verbose) as bar:
            for c in range(C):
                s, e = int(starts[c]), int(starts[c + 1])
                cent[c, :, :e - s] = kmeans(A[:, s:e], NBUCKETS, rng, self.max_iter)
                bar.update()
        self.starts_ = starts
        self.centroids_ = cent

    def _encode(self, A):
        return kernels.encode_pq(A, self._learned("centroids_", A), self.starts_)

    def _prototypes_lut(self, B):
        cent = self._learned("centroids_", B)
        xp_lut = []
        for c in range(cent.shape[0]):
            s, e = int(self.starts_[c]), int(self.starts_[c + 1])
            xp_lut.append(cent[c, :, :e - s] @ B[s:e])
        from ..arrays import backend
        return backend.namespace(B).stack(xp_lut)
