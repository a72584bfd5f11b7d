"""The exact product: the reference, and a NimbusLayer's training mode."""
from __future__ import annotations

from ..arrays import kernels
from .base import Strategy


class Exact(Strategy):
    """``A @ B`` by the array library's matmul (BLAS on the CPU, cuBLAS on the GPU).

    It has no codes: ``encode(A)`` returns A (float32) and ``lookup(A)`` returns
    ``A @ B``, so the interface is the same as the approximate strategies'.

    Learned attributes
    ------------------
    n_features_in_ : D;  B_ : (D, M) float32 (after ``build_lut``)
    """

    name = "exact"
    needs_codes = False
    folds_output_affine = False        # no LUT: a layer holding it folds into its weights

    def __init__(self, ncodebooks=None, *, random_state=None):
        self.ncodebooks = ncodebooks
        self.quantize = False
        self.random_state = random_state

    def _check_params(self):
        pass

    def _fit(self, A, rng, B):
        pass

    def _use_B(self, B):
        self._cache = {}
        self.B_ = B

    def _encode(self, A):
        return A

    def lookup(self, codes):
        return self(codes)

    def __call__(self, A, *, check_finite=True):
        self._check_fitted("B_")
        with kernels.finite_checks(check_finite):       # (also validates the flag)
            A = self._check_rows(A, check_finite=check_finite)
        return A @ self._learned("B_", A)

    @property
    def lut_bytes(self):
        self._check_fitted("B_")
        return int(self.B_.size * 4)
