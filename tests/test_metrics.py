import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from hf_lsce.evaluation.metrics import (
    classification_metrics,
    entity_metrics,
    entity_spans,
    reliability_bins,
    risk_coverage_curve,
    selective_risk,
    softmax,
)


def _random_problem(seed: int, n: int, k: int, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    return logits, labels


@pytest.mark.parametrize("n,k,seed", [(50, 2, 0), (97, 3, 1), (200, 5, 2), (13, 7, 3)])
def test_classification_metrics_match_sklearn(n, k, seed):
    logits, labels = _random_problem(seed, n, k)
    probs = softmax(logits)
    predictions = logits.argmax(axis=1)
    got = classification_metrics(logits, labels)

    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(labels, predictions, average="macro"))
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, predictions))
    assert got["nll"] == pytest.approx(skm.log_loss(labels, probs, labels=list(range(k))), rel=1e-6)
    # scikit-learn halves the binary Brier score by default; the original definition sums over all classes.
    expected_brier = skm.brier_score_loss(labels, probs if k > 2 else probs[:, 1], scale_by_half=False)
    assert got["brier"] == pytest.approx(expected_brier)
    if k == 2:
        assert got["f1"] == pytest.approx(skm.f1_score(labels, predictions))
    else:
        assert "f1" not in got
    assert set(got) >= {"accuracy", "macro_f1", "mcc", "nll", "ece", "brier", "aurc", "error_at_80_coverage"}


def test_macro_f1_over_present_classes_and_degenerate_mcc():
    # Class 2 is neither a label nor a prediction: like scikit-learn, it does not drag the macro average to 0.
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1])
    got = classification_metrics(logits, labels)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(labels, logits.argmax(1), average="macro"))
    # A constant prediction makes MCC undefined; scikit-learn (and we) report 0.
    constant = np.tile([1.0, 0.0], (4, 1))
    assert classification_metrics(constant, np.array([0, 1, 0, 1]))["mcc"] == 0.0


def test_nll_is_stable_for_extreme_logits():
    logits = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]])
    got = classification_metrics(logits, np.array([0, 0]))
    assert got["nll"] == pytest.approx(1000.0)  # (0 + 2000) / 2, no overflow or log(0)


def test_ece_hand_computed():
    # Four examples, 2 classes, n_bins=5 (edges 0, .2, .4, .6, .8, 1):
    #   conf 0.9 correct, conf 0.9 wrong  -> bin (0.8, 1]: acc 0.5, conf 0.9, gap 0.4, weight 2/4
    #   conf 0.7 correct                  -> bin (0.6, 0.8]: acc 1, conf 0.7, gap 0.3, weight 1/4
    #   conf 0.6 wrong (exactly on an edge, goes to the bin below) -> bin (0.4, 0.6]: gap 0.6, weight 1/4
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 0])
    bins = reliability_bins(probs, labels, n_bins=5)
    np.testing.assert_allclose(bins["bin_lower"], [0.0, 0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(bins["bin_upper"], [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_array_equal(bins["count"], [0, 0, 1, 1, 2])
    np.testing.assert_allclose(bins["accuracy"], [np.nan, np.nan, 0.0, 1.0, 0.5])
    np.testing.assert_allclose(bins["confidence"], [np.nan, np.nan, 0.6, 0.7, 0.9])
    expected_ece = 2 / 4 * 0.4 + 1 / 4 * 0.3 + 1 / 4 * 0.6
    logits = np.log(probs)  # softmax(log p) == p
    assert classification_metrics(logits, labels, n_bins=5)["ece"] == pytest.approx(expected_ece)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    # Confidence 0.75 everywhere and 3 of 4 right: perfectly calibrated.
    probs = np.tile([0.75, 0.25], (4, 1))
    assert classification_metrics(np.log(probs), np.array([0, 0, 0, 1]))["ece"] == pytest.approx(0.0, abs=1e-12)
    overconfident = np.tile([20.0, 0.0], (4, 1))
    assert classification_metrics(overconfident, np.array([0, 1, 0, 1]))["ece"] == pytest.approx(0.5, abs=1e-6)


def _logits_with_confidence(confidence, predicted_class, num_classes=2):
    """Logits whose softmax gives `predicted_class` the probability `confidence` and the rest equal shares."""
    probs = np.full((len(confidence), num_classes), 0.0)
    for row, (top, predicted) in enumerate(zip(confidence, predicted_class)):
        probs[row] = (1 - top) / (num_classes - 1)
        probs[row, predicted] = top
    return np.log(probs)


def test_aurc_and_error_at_80_coverage_hand_computed():
    # Five predictions, all of class 0, confidences 0.95, 0.9, 0.8, 0.7, 0.6 (already sorted); labels make the
    # 2nd and 5th wrong. Errors in confidence order: 0, 1, 0, 0, 1. Selective risks r_k = errors among the k most
    # confident / k: r_1 = 0, r_2 = 1/2, r_3 = 1/3, r_4 = 1/4, r_5 = 2/5.
    # AURC = (0 + 1/2 + 1/3 + 1/4 + 2/5) / 5 = (30 + 20 + 15 + 24) / 60 / 5 = 89/300.
    # 80 % coverage keeps ceil(0.8 * 5) = 4 predictions: error 1/4.
    logits = _logits_with_confidence([0.95, 0.9, 0.8, 0.7, 0.6], [0] * 5)
    labels = np.array([0, 1, 0, 0, 1])
    curve = risk_coverage_curve(logits, labels)
    np.testing.assert_allclose(curve["coverage"], [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(curve["risk"], [0, 1 / 2, 1 / 3, 1 / 4, 2 / 5])
    got = classification_metrics(logits, labels)
    assert got["aurc"] == pytest.approx(89 / 300)
    assert got["error_at_80_coverage"] == pytest.approx(1 / 4)
    assert selective_risk(logits, labels, coverage=0.8) == pytest.approx(1 / 4)
    assert selective_risk(logits, labels, coverage=1.0) == pytest.approx(1 - got["accuracy"])
    # ceil(0.5 * 5) = 3 kept (the smallest count that covers 50 %); ceil(0.01 * 5) = 1.
    assert selective_risk(logits, labels, coverage=0.5) == pytest.approx(1 / 3)
    assert selective_risk(logits, labels, coverage=0.01) == 0.0

    # The input order does not matter, only the confidences.
    shuffle = np.array([3, 0, 4, 2, 1])
    assert classification_metrics(logits[shuffle], labels[shuffle])["aurc"] == pytest.approx(89 / 300)


def test_aurc_ties_are_averaged_over_their_orders():
    # Confidences 0.9 (right), 0.6 (wrong), 0.6 (right), 0.5 (wrong). The two 0.6 predictions can come in either
    # order: errors 0, 1, 0, 1 (risks 0, 1/2, 1/3, 1/2) or 0, 0, 1, 1 (risks 0, 0, 1/3, 1/2). Their average:
    # r = 0, 1/4, 1/3, 1/2, so AURC = (0 + 1/4 + 1/3 + 1/2) / 4 = 13/48; 50 % coverage keeps 2: error 1/4.
    logits = _logits_with_confidence([0.9, 0.6, 0.6, 0.5], [0, 0, 0, 0])
    labels = np.array([0, 1, 0, 1])
    np.testing.assert_allclose(risk_coverage_curve(logits, labels)["risk"], [0, 1 / 4, 1 / 3, 1 / 2])
    assert classification_metrics(logits, labels)["aurc"] == pytest.approx(13 / 48)
    assert selective_risk(logits, labels, coverage=0.5) == pytest.approx(1 / 4)
    # Swapping the tied rows gives the same numbers; a sort that kept the input order would give 13/48 -+ 1/16.
    swapped = [0, 2, 1, 3]
    assert classification_metrics(logits[swapped], labels[swapped])["aurc"] == pytest.approx(13 / 48)


def _aurc_by_enumerating_tie_orders(confidence, errors):
    """Independent reference: the plain sorted AURC averaged over every order of every tie group."""
    confidence, errors = np.asarray(confidence), np.asarray(errors, dtype=float)
    values = sorted(set(confidence.tolist()), reverse=True)
    groups = [list(np.flatnonzero(confidence == value)) for value in values]
    totals = []
    for orders in itertools.product(*(itertools.permutations(group) for group in groups)):
        sequence = errors[[index for order in orders for index in order]]
        totals.append(np.mean(np.cumsum(sequence) / np.arange(1, len(sequence) + 1)))
    return float(np.mean(totals))


@pytest.mark.parametrize("seed", range(6))
def test_aurc_matches_brute_force_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    n = 8
    confidence = rng.choice([0.55, 0.7, 0.85, 0.99], size=n)  # four levels among 8 rows: many ties
    predicted = rng.integers(0, 2, size=n)
    logits = _logits_with_confidence(confidence, predicted)
    labels = rng.integers(0, 2, size=n)
    # The confidences after softmax must tie exactly where the inputs do, or the check tests nothing. With two
    # classes the rows of one level are [a, b] or [b, a], whose softmax sums add the same two numbers.
    recovered = softmax(logits).max(axis=1)
    assert len(set(recovered.tolist())) == len(set(confidence.tolist()))
    expected = _aurc_by_enumerating_tie_orders(recovered, predicted != labels)
    assert classification_metrics(logits, labels)["aurc"] == pytest.approx(expected, abs=1e-12)


def test_aurc_ranks_and_bounds():
    # Every prediction right: AURC 0. Constant confidence: every coverage has the overall error rate.
    labels = np.array([0, 1, 0, 1, 0, 1])
    perfect = np.where(labels[:, None] == np.arange(2), 3.0, 0.0)
    assert classification_metrics(perfect, labels)["aurc"] == 0.0
    constant = np.tile([2.0, 0.0], (6, 1))
    assert classification_metrics(constant, labels)["aurc"] == pytest.approx(0.5)
    assert classification_metrics(constant, labels)["error_at_80_coverage"] == pytest.approx(0.5)
    # Negative control: same predictions and accuracy, but confidence ranks the errors first instead of last.
    predicted = np.zeros(6, dtype=int)
    errors_least_confident = _logits_with_confidence([0.9, 0.8, 0.7, 0.65, 0.6, 0.55], predicted)
    errors_most_confident = _logits_with_confidence([0.55, 0.9, 0.6, 0.8, 0.65, 0.7], predicted)
    good = classification_metrics(errors_least_confident, labels)
    bad = classification_metrics(errors_most_confident, labels)
    assert good["accuracy"] == bad["accuracy"] == 0.5
    assert good["aurc"] < 0.5 < bad["aurc"]
    assert good["error_at_80_coverage"] < bad["error_at_80_coverage"]


def test_selective_risk_bad_coverage():
    logits, labels = _random_problem(6, 10, 2)
    for coverage in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"coverage must be a float in \(0, 1\], got"):
            selective_risk(logits, labels, coverage=coverage)
    for coverage in (True, "0.8", None):
        with pytest.raises(TypeError, match=r"coverage must be a float in \(0, 1\], got"):
            selective_risk(logits, labels, coverage=coverage)


def test_reliability_bins_counts_add_up():
    logits, labels = _random_problem(4, 500, 4)
    bins = reliability_bins(softmax(logits), labels, n_bins=15)
    assert bins["count"].sum() == 500 and bins["count"].dtype == np.int64
    assert all(len(value) == 15 for value in bins.values())
    filled = bins["count"] > 0
    assert np.all(bins["confidence"][filled] > bins["bin_lower"][filled])
    assert np.all(bins["confidence"][filled] <= bins["bin_upper"][filled])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"labels must hold class indices in \[0, 2\), got -100"):
        classification_metrics(np.zeros((3, 2)), np.array([0, 1, -100]))
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        classification_metrics(np.zeros(3), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(np.full((2, 2), 0.5), np.array([0, 1]), n_bins=0)
    with pytest.raises(TypeError, match="labels must be integers"):
        classification_metrics(np.zeros((2, 2)), np.array([0.0, 1.0]))


def test_evaluate_metric_wrappers():
    evaluate = pytest.importorskip("evaluate")
    pytest.importorskip("datasets")
    import hf_lsce.evaluation.evaluate_metrics
    from hf_lsce.evaluation.evaluate_metrics import ClassificationMetric, EntityMetric

    logits, labels = _random_problem(5, 40, 3)
    expected = classification_metrics(logits, labels, n_bins=10)
    metric = ClassificationMetric()
    for start in range(0, 40, 16):
        metric.add_batch(predictions=logits[start : start + 16], references=labels[start : start + 16])
    got = metric.compute(n_bins=10)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6)

    # evaluate.load on the shipped file works offline and gives the classification metric.
    loaded = evaluate.load(hf_lsce.evaluation.evaluate_metrics.__file__)
    assert loaded.compute(predictions=logits, references=labels)["accuracy"] == pytest.approx(expected["accuracy"])

    entities = EntityMetric().compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])
    assert entities["f1"] == 1.0


def test_entity_spans_conventions():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entity_spans(["O", "I-PER", "I-PER"]) == {("PER", 1, 3)}  # I- without B- starts an entity
    assert entity_spans(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}  # a type change ends it
    assert entity_spans(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert entity_spans(["S-PER", "B-LOC", "E-LOC", "O"]) == {("PER", 0, 1), ("LOC", 1, 3)}
    assert entity_spans(["O", "O"]) == set()


def test_entity_metrics_hand_computed():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    got = entity_metrics(predictions, references)
    # True: PER, LOC, ORG; predicted: PER, ORG, LOC (wrong place); 2 hits.
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["PER_f1"] == 1.0 and got["ORG_f1"] == 1.0 and got["LOC_f1"] == 0.0


def test_entity_metrics_match_seqeval():
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    references = [list(rng.choice(tags, size=rng.integers(1, 12))) for _ in range(200)]
    predictions = [[t if rng.random() < 0.7 else str(rng.choice(tags)) for t in seq] for seq in references]
    got = entity_metrics(predictions, references)
    assert got["precision"] == pytest.approx(seqeval_metrics.precision_score(references, predictions))
    assert got["recall"] == pytest.approx(seqeval_metrics.recall_score(references, predictions))
    assert got["f1"] == pytest.approx(seqeval_metrics.f1_score(references, predictions))
    report = seqeval_metrics.classification_report(references, predictions, output_dict=True)
    for kind in ("PER", "LOC", "MISC"):
        assert got[f"{kind}_f1"] == pytest.approx(report[kind]["f1-score"])


_HEAVY = {"transformers", "datasets", "evaluate"}


def _modules_added(*statements: str) -> list[set[str]]:
    """Top-level packages each statement adds to `sys.modules`, run in order in one fresh interpreter."""
    code = "import json, sys\nsteps = []\n"
    for statement in statements:
        code += f"before = set(sys.modules)\n{statement}\nsteps.append(sorted(set(sys.modules) - before))\n"
    code += "print(json.dumps(steps))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [{name.split(".")[0] for name in step} for step in json.loads(result.stdout.splitlines()[-1])]


def test_numpy_metrics_and_calibration_do_not_import_transformers_datasets_or_evaluate():
    package, metrics, calibration, wrappers = _modules_added(
        "import hf_lsce",
        "import hf_lsce.evaluation.metrics",
        "import hf_lsce.evaluation.calibration",
        "import hf_lsce.evaluation.evaluate_metrics",
    )
    assert not metrics & _HEAVY, sorted(metrics)
    assert not calibration & _HEAVY, sorted(calibration)
    # Negative control: the wrappers' module loads what the others must not, unless `import hf_lsce` already did.
    assert {"evaluate", "datasets"} <= wrappers | package
    if not package & _HEAVY:  # once `import hf_lsce` is lazy (issue 10 item 5), the check is absolute
        assert {"evaluate", "datasets"} <= wrappers
