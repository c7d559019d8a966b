"""Defaults shared by the library and every command (kept free of heavy imports: the CLI reads them to build
its options)."""

EORA_RANK_DEFAULT = 32  # one default for `compress model --compensate eora` and `compress compensate`
