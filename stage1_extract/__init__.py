"""Stage 1: images -> frozen CNN -> HDF5 feature cache (`python -m stage1_extract`)."""
