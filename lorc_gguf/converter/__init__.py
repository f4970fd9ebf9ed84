"""The converter: singular values (``spectra``), ranks per layer (``allocate``), the factorization
(``factorize``, ``aware``) and the conversion itself (``pipeline.convert``), its JSON report
(``report``), HF input (``hf``), importance matrices (``imatrix``) and dense equivalents (``dense``)."""
