"""A short run of the loaders' fuzzer (tests/loader_fuzzer.py): mutated model.bin, tokenizer.bin, ckpt.pt,
config and meta.json files are accepted or refused with the loader's own error, never anything else."""

from tests.loader_fuzzer import fuzz


def test_mutated_inputs_are_refused_cleanly():
    stats = fuzz(seconds=5.0, seed=12345, log=lambda *_: None)
    assert set(stats) == {"model.bin", "tokenizer.bin", "ckpt.pt", "config.toml", "meta.json"}
    for name, (rounds, _, findings) in stats.items():
        assert rounds > 5, name  # it did run
        assert not findings, f"{name}: {len(findings)} unexpected exceptions, the first:\n{findings[0]}"
    # the mutations reach past the first check: some inputs still load, most are refused
    assert 0 < stats["model.bin"][1] < stats["model.bin"][0]
