"""`python -m vitkern.demo` (what `make demo` runs) keeps working and prints what it promises."""

from vitkern import demo


def test_demo_runs(capsys):
    assert demo.main(["--model", "vit_tiny_patch16_224", "--throughput-models", "vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "Backends on this machine" in out
    assert "max |logits - timm logits|" in out
    assert "img/s" in out
