"""CT numbers (HU) to mass density and to stopping power relative to water (RSP).

One piecewise-linear calibration, stoichiometric in style: nodes at the CT numbers of reference
tissues (air, inflated lung, adipose, water, muscle, a soft-tissue/bone mixture, cortical bone) with
the density and RSP of those tissues, linear in between and flat beyond the end nodes.

=======  ================  =======  ======================================
HU       density (g/cm^3)  RSP      tissue at the node
=======  ================  =======  ======================================
-1000    0.00121           0.00107  air
-750     0.26              0.255    inflated lung
-100     0.95              0.975    adipose tissue
0        1.00              1.000    water
40       1.05              1.040    muscle / soft tissue
100      1.09              1.075    start of the soft-tissue/bone mixtures
1500     1.92              1.800    cortical bone
3000     2.81              2.580    dense bone (bone line extended)
=======  ================  =======  ======================================

Densities and RSPs are rounded values for ICRU-like reference tissues; the HU of each node is the
typical CT number of that tissue on a clinical 120 kVp scanner. The table is generic, not the
calibration of any particular scanner: the Monte Carlo engine uses its own scanner table, so the
analytic and Monte Carlo engines differ slightly in bone.
"""

from __future__ import annotations

import numpy as np

#: Name recorded in dataset files (``hu_calibration`` attribute) for this table.
HU_CALIBRATION_NAME: str = "dota-piecewise-stoichiometric-v1"

#: The calibration nodes: (HU, mass density g/cm^3, RSP); see the module docstring.
HU_CALIBRATION_TABLE: tuple[tuple[float, float, float], ...] = (
    (-1000.0, 0.00121, 0.00107),
    (-750.0, 0.26, 0.255),
    (-100.0, 0.95, 0.975),
    (0.0, 1.00, 1.000),
    (40.0, 1.05, 1.040),
    (100.0, 1.09, 1.075),
    (1500.0, 1.92, 1.800),
    (3000.0, 2.81, 2.580),
)

_NODES = np.array(HU_CALIBRATION_TABLE, dtype=np.float64)


def hu_to_rsp(hu: np.ndarray) -> np.ndarray:
    """Stopping power relative to water for CT numbers ``hu`` (any shape; float64 out).

    Values below -1000 HU are taken as air, values above 3000 HU as the 3000 HU node.
    """
    return np.interp(np.asarray(hu, dtype=np.float64), _NODES[:, 0], _NODES[:, 2])


def hu_to_density(hu: np.ndarray) -> np.ndarray:
    """Mass density in g/cm^3 for CT numbers ``hu`` (any shape; float64 out), same table as :func:`hu_to_rsp`."""
    return np.interp(np.asarray(hu, dtype=np.float64), _NODES[:, 0], _NODES[:, 1])
