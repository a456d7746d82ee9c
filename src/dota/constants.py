"""Every constant the package shares, in one place.

Values quoted from the DoTA paper (Pastor-Serrano & Perko, PMB 2022) and the dataset format
(``../shared/dataset-format.md``) are marked as such.
"""

from __future__ import annotations

#: Default beam's-eye-view block, (depth, rows, cols) voxels: 150 x 24 x 24 (paper).
BLOCK_SHAPE: tuple[int, int, int] = (150, 24, 24)
#: Voxel size of the default block in mm, (depth, row, col) (paper).
VOXEL_MM: tuple[float, float, float] = (2.0, 2.0, 2.0)
#: Energy range the paper model was trained on, MeV; the default min-max scaling of the energy token.
PAPER_ENERGY_RANGE_MEV: tuple[float, float] = (70.0, 220.0)
#: Energies our engines (analytic, MCsquare beam model) are validated for, MeV.
ENGINE_ENERGY_RANGE_MEV: tuple[float, float] = (70.0, 225.0)

#: HU of air; fills everything outside a CT and the lateral padding of blocks.
HU_AIR: float = -1000.0
#: Voxels at or below this HU are air (outside the patient, or in airways): the "in patient" gamma pass
#: rates of beamlets (``dota evaluate``) and of plans (``dota dose --reference``) leave them out. Dose to
#: water in air behind or before a patient is real in Monte Carlo and in the engines, but no treatment
#: plan evaluates it; it is where most gamma failures of every engine are.
AIR_HU: float = -900.0
#: HU range kept when scaling geometry for the network (values beyond are clipped).
HU_CLIP: tuple[float, float] = (-1000.0, 3000.0)

#: Dataset format (``dataset-format.md``).
FORMAT_VERSION: int = 1
DOSE_UNIT: str = "Gy per 1e9 primaries"
PRIMARIES_UNIT: float = 1e9

#: Gamma protocol of the paper: global 1 %/3 mm, no low-dose cutoff; reference dose below 0.1 %
#: of its maximum and prediction below 0.5 % are set to zero before the comparison.
PAPER_GAMMA_DOSE_PERCENT: float = 1.0
PAPER_GAMMA_DTA_MM: float = 3.0
PAPER_GAMMA_REF_ZERO_FRACTION: float = 0.001
PAPER_GAMMA_EVAL_ZERO_FRACTION: float = 0.005

#: Published anchors (paper, 3888 test beamlets), used in reports beside our own figures.
PAPER_GAMMA_PASS_DOTA: float = 99.37
PAPER_GAMMA_PASS_PENCIL_BEAM: float = 98.68
PAPER_REL_ERROR_DOTA: float = 0.126
PAPER_REL_ERROR_PENCIL_BEAM: float = 0.306

#: Output cutoff of the inference engine, as a fraction of the beamlet's dose maximum: dose the full
#: model predicts below this beyond the computed range is allowed to be returned as zero. 1e-3 is the
#: paper's own zero level for reference dose (PAPER_GAMMA_REF_ZERO_FRACTION), and Monte Carlo truth
#: itself is not zero beyond a beam's range: MCsquare at 1e6 primaries (tests/data/golden_mc.h5) puts
#: 4e-4 to 7e-4 of the maximum beyond the engine's cut (secondaries and noise reach the end of the
#: block), so a model trained on it cannot meet a smaller cutoff (1e-6 was the first value here).
OUTPUT_CUTOFF_FRACTION: float = 1e-3

#: MCsquare (Monte Carlo ground truth): the PyPI wheel its Linux builds and data come from, and the
#: primaries per beamlet used when none are given (about 2 % statistical uncertainty at the peak).
MCSQUARE_WHEEL: str = "opentps-core==2.0.0"
MCSQUARE_DEFAULT_PRIMARIES: int = 100_000

#: Water-equivalent safety margin (mm) the inference engine adds to a beamlet's analytic dose extent
#: when it truncates the computed depth (``dota.physics.stopping_depth_index``); validated against the
#: analytic engine and trained models in ``tests/inference/test_truncation.py``.
TRUNCATION_MARGIN_MM: float = 5.0
