"""benchmarks/studies/ppl_conventions.py: each convention reads the test file as its name says."""

from __future__ import annotations

from ppl_conventions import CONVENTIONS


def test_each_convention_turns_the_file_into_its_own_text(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Title = \r\n Body one .\r\n Body two .\r\n")
    texts = {name: to_text(path) for name, (to_text, _) in CONVENTIONS.items()}
    assert texts["spap"] == " = Title = \n\n Body one .\n\n Body two ."
    assert texts["spap-second-half"] == texts["spap"]
    assert texts["raw-crlf"] == " = Title = \r\n Body one .\r\n Body two .\r\n"
    assert texts["text-mode"] == " = Title = \n Body one .\n Body two .\n"
    assert {name: fraction for name, (_, fraction) in CONVENTIONS.items()} == {
        "spap": 0.0,
        "spap-second-half": 0.5,
        "raw-crlf": 0.0,
        "text-mode": 0.0,
    }
