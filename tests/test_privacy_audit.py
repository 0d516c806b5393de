"""Privacy audit (simulations/privacy_audit.py): the one-run bound, the accounting, and a real audit
of the node's train_dp that refutes a run with 5× less noise than charged and not the honest run.

The real audit uses the module defaults (claimed ε = 3, the node's run config, 500 canaries in 25
training runs of one round): 5–16 s per audited training on the shared 2-core machine, ~22 s for
the honest run and the control together; the whole file ~50 s.
"""

from __future__ import annotations

import math
from html.parser import HTMLParser

import numpy as np
import pytest

from simulations.privacy_audit import (
    PrivacyAuditConfig,
    charged_sigma,
    eps_lower_bound,
    max_eps_lower_bound,
    p_value,
    replace_one_epsilon,
    replace_one_sigma,
    run_privacy_audit,
    write_privacy_audit,
)

DELTA = 1e-5


# ---------------------------------------------------------------------------- one-run bound


def test_bound_reproduces_published_values():
    # Values printed in Steinke, Nasr & Jagielski (2023) for their Appendix D code (App. D and §7,
    # Fig. 11), as quoted by an independent implementation: (m, r, v, δ, β) → ε lower bound.
    assert eps_lower_bound(1000, 100, 75, 1e-4, 0.05) == pytest.approx(0.673, abs=1e-3)
    assert eps_lower_bound(100000, 1510, 1439, 1e-5, 0.05) == pytest.approx(2.675, abs=2e-3)


def test_bound_shape():
    assert eps_lower_bound(500, 200, 100, DELTA, 0.05) == 0.0  # chance accuracy proves nothing
    assert eps_lower_bound(500, 200, 0, DELTA, 0.05) == 0.0
    bounds = [eps_lower_bound(500, 200, v, DELTA, 0.05) for v in range(120, 201, 10)]
    assert all(b > a for a, b in zip(bounds, bounds[1:]))
    assert max_eps_lower_bound(500, 200, DELTA, 0.05) == pytest.approx(bounds[-1])
    # the sample size caps what the audit can show: ≈ 4.2 with 200 guesses, never 8
    assert 4.0 < max_eps_lower_bound(500, 200, DELTA, 0.05) < 4.4
    assert max_eps_lower_bound(500, 100, DELTA, 0.05) < max_eps_lower_bound(500, 200, DELTA, 0.05)
    # the p-value at the returned ε is (just) below β
    lb = eps_lower_bound(500, 200, 190, DELTA, 0.05)
    assert p_value(500, 200, 190, lb, DELTA) < 0.05 <= p_value(500, 200, 190, lb + 1e-3, DELTA)


@pytest.mark.parametrize("eps", [0.5, 1.0, 3.0])
def test_bound_is_valid_against_randomised_response(eps):
    """Against an exactly ε-DP guesser (each of r guesses right w.p. e^ε/(1+e^ε), independently),
    P[bound > ε] ≤ β: computed exactly over the Binomial(r, ·) law of the number correct."""
    from scipy.stats import binom

    m, r, beta = 500, 200, 0.05
    p_right = 1 / (1 + math.exp(-eps))
    exceed = sum(binom.pmf(v, r, p_right) for v in range(r + 1) if eps_lower_bound(m, r, v, DELTA, beta) > eps)
    assert 0 < exceed <= beta  # > 0: the bound does exceed ε for lucky draws, as a valid test must


# ---------------------------------------------------------------------------- accounting


def test_replace_one_sigma_is_tight_and_replace_one_costs_more():
    q, steps = 1 / 9, 18
    sigma = replace_one_sigma(3.0, q, steps, DELTA)
    assert replace_one_epsilon(sigma, q, steps, DELTA) <= 3.0
    assert replace_one_epsilon(sigma / 1.002, q, steps, DELTA) > 3.0
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution as pld

    add_remove = pld.from_gaussian_mechanism(
        sigma, sampling_prob=q, neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=1e-3).self_compose(steps).get_epsilon_for_delta(DELTA)
    assert add_remove < 3.0 * 0.8  # the relation matters: replace-one is the costlier one
    assert replace_one_epsilon(sigma / 5, q, steps, DELTA) > 20  # the planted bug is a gross violation


def test_node_calibration_matches_independent_replace_one_accounting():
    """The σ the audited node charges (client.calibration) spends ε under this module's own PLD."""
    q, steps = 1 / 9, 18
    node = charged_sigma(3.0, q, steps, DELTA)
    assert node == pytest.approx(replace_one_sigma(3.0, q, steps, DELTA), rel=2e-3)
    assert replace_one_epsilon(node, q, steps, DELTA) <= 3.0 + 1e-6
    assert replace_one_epsilon(node / 1.002, q, steps, DELTA) > 3.0


# ---------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def audit():
    return run_privacy_audit(PrivacyAuditConfig(), seed=0, control_scale=0.2)


def test_audit_refutes_less_noise_than_charged(audit):
    control = audit.iloc[1]
    assert control.noise_multiplier == pytest.approx(0.2 * control.charged_noise_multiplier)
    assert control.flagged and control.eps_lower_bound > control.claimed_epsilon == 3.0
    assert control.confidence == pytest.approx(0.95)
    assert control.eps_lower_bound <= control.max_possible_bound + 1e-9
    assert control.max_possible_bound > control.claimed_epsilon  # the audit *can* fail at this size


def test_audit_does_not_refute_the_honest_node(audit):
    honest = audit.iloc[0]
    assert honest.noise_multiplier == honest.charged_noise_multiplier
    assert honest.true_epsilon <= 3.0 + 1e-9
    assert not honest.flagged and honest.eps_lower_bound <= honest.claimed_epsilon
    # measured over seeds 0–9 (500 canaries): 0.34–0.87, far below 3 (the one-run bound is loose)
    assert honest.eps_lower_bound < 2.0


def test_audit_models_the_training_exactly(audit):
    """σ̂, measured from the iterates alone, is the σ the training used (the control's is 5× lower)."""
    for r in audit.itertuples(index=False):
        assert r.measured_noise_multiplier == pytest.approx(r.noise_multiplier, rel=0.1)
    results = audit.attrs["results"]
    assert np.array_equal(results[0].signs, results[1].signs)  # same canaries, same coins


def test_write_privacy_audit(audit, tmp_path):
    paths = write_privacy_audit(audit, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    assert "REFUTED" in html and "not refuted" in html and "largest possible bound" in html
    assert 'src="data:image/png;base64,' in html
    _assert_standalone_document(html, "fedalloc privacy audit")


def test_audit_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from fedalloc.commands_audit import audit_command

    app = typer.Typer()
    app.command()(audit_command)
    # tiny and fast: 20 canaries in one run, no control, no sanity plot
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "a"), "--canaries", "20", "--canaries-per-run", "20",
                                   "--control-scale", "0", "--no-mia"])
    assert res.exit_code == 0, res.output
    assert "Privacy audit" in res.output and "not refuted" in res.output
    assert (tmp_path / "a" / "privacy_audit.csv").exists() and (tmp_path / "a" / "audit.html").exists()
    page = (tmp_path / "a" / "audit.html").read_text()
    _assert_standalone_document(page, "fedalloc privacy audit")
    assert "Privacy audit: record-level ε lower bound" in page and "not refuted" in page
    assert CliRunner().invoke(app, ["--out", str(tmp_path / "b"), "--claimed-epsilon", "0"]).exit_code == 2


# ---------------------------------------------------------------------------- the page


class _Structure(HTMLParser):
    """Counts the document-level tags and collects the title text."""

    def __init__(self) -> None:
        super().__init__()
        self.decl: list[str] = []
        self.tags: dict[str, int] = {}
        self.title = ""
        self._in_title = False

    def handle_decl(self, decl: str) -> None:
        self.decl.append(decl)

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _assert_standalone_document(text: str, title: str) -> None:
    assert text.lstrip().lower().startswith("<!doctype html>"), text[:80]
    p = _Structure()
    p.feed(text)
    assert [d.lower() for d in p.decl] == ["doctype html"]
    for tag in ("html", "head", "title", "body"):
        assert p.tags.get(tag) == 1, (tag, p.tags.get(tag))  # one document, not nested fragments
    assert '<meta charset="utf-8">' in text
    assert p.title.strip() == title
    assert text.rstrip().endswith("</html>")


def test_audit_page_is_a_standalone_document_and_escapes_its_data():
    from simulations.privacy_audit import audit_page
    from simulations.templating import render

    section = render("privacy_audit_section.html.j2", head=["run"], rows=[["<script>x</script>"]],
                     note="hospital <b>", png=None)
    assert "&lt;script&gt;" in section and "<script>" not in section and "hospital &lt;b&gt;" in section
    page = audit_page([section, "<section id=\"second\"><h2>Sanity plot, not an audit</h2></section>"])
    _assert_standalone_document(page, "fedalloc privacy audit")
    assert page.index("Privacy audit") < page.index("Sanity plot, not an audit")  # sections kept in order
    assert page.count("<section") == 2
