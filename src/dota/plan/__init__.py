"""Whole treatment plans: CT and plan input, beam's-eye-view dose through any engine, deposition back
into the CT grid, RTDOSE/MHD/NIfTI output, DVHs, dose-influence matrices and a spot-weight optimiser."""
