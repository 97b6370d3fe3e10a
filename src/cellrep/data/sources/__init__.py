"""Readers of datasets in their own formats (RxRx1, RxRx3-core, TIFF plates, the synthetic screen),
each yielding canonical metadata and one image per site (docs/data.md)."""
