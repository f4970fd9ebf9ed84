"""The GGUF file format of LoRC: metadata keys and tensor names (``keys``), reading (``read``) and
writing (``write``) GGUFs, and the one reader of LoRC metadata (``info``, ``describe``)."""
