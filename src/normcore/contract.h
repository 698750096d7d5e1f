/* Constants of the kernel contract shared by the CPU kernels (kernels.pxi includes this
   file) and, through normcore.contract, by the Python orchestration and the CUDA kernels
   (normcore.gpu passes them to NVRTC as -D options): one definition of each. */
#ifndef NORMCORE_CONTRACT_H
#define NORMCORE_CONTRACT_H

/* Where a row's affine parameters live (normalize_groups, backward_groups). */
enum nc_affine_kind {
    NC_AFFINE_NONE = 0,   /* no weight or bias */
    NC_AFFINE_ROW = 1,    /* one w/b per row: w[rp[r]] */
    NC_AFFINE_INNER = 2   /* w/b along the row: w[rp[r] + s] */
};

#endif
