"""LICENSE is BSD-3-Clause (LAVIS's licence); CITATION.cff is valid YAML citing the paper and LAVIS."""

import yaml

from helpers import REPO


def test_license_is_bsd_3_clause_like_lavis():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Neither the name of the copyright holder" in text
    assert 'license="BSD-3-Clause"' in (REPO / "setup.py").read_text()


def test_citation_cites_the_paper_and_lavis():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "BSD-3-Clause"
    assert cff["preferred-citation"]["identifiers"][0]["value"] == "arXiv:2407.13851"
    assert [a["family-names"] for a in cff["preferred-citation"]["authors"]][0] == "Swetha"
    assert any("LAVIS" in ref["title"] for ref in cff["references"])
