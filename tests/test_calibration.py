import numpy as np
import pytest
import torch

from hf_lsce.evaluation.calibration import apply_temperature, fit_temperature, temperature_nll


def _calibrated_fixture(n=4000, num_classes=3, seed=0):
    """Logits whose softmax is the true label distribution: labels are drawn from softmax(logits)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, num_classes, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_over_confident_logits_get_softened():
    logits, labels = _calibrated_fixture()
    over_confident = 4.0 * logits  # a model 4x too sure of itself: the true temperature is 4
    temperature = fit_temperature(over_confident, labels)

    assert temperature == pytest.approx(4.0, rel=0.1)
    scaled = apply_temperature(over_confident, temperature)
    assert temperature_nll(scaled, labels, 1.0) < temperature_nll(over_confident, labels, 1.0) - 0.1
    torch.testing.assert_close(scaled.argmax(-1), over_confident.argmax(-1))


def test_under_confident_logits_get_sharpened():
    logits, labels = _calibrated_fixture(seed=1)
    temperature = fit_temperature(0.5 * logits, labels)
    assert temperature == pytest.approx(0.5, rel=0.1)


def test_calibrated_logits_keep_temperature_one():
    # Negative control: nothing to fix, so the fit must not invent a correction.
    logits, labels = _calibrated_fixture(seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)


def test_fit_is_the_nll_minimum_and_deterministic():
    logits, labels = _calibrated_fixture(n=500, seed=3)
    logits = 3.0 * logits
    temperature = fit_temperature(logits, labels)
    assert fit_temperature(logits, labels) == temperature
    best = temperature_nll(logits, labels, temperature)
    for other in (0.8 * temperature, 0.95 * temperature, 1.05 * temperature, 1.25 * temperature):
        assert best <= temperature_nll(logits, labels, other) + 1e-12


def test_numpy_and_float32_inputs():
    logits, labels = _calibrated_fixture(n=300, seed=4)
    from_numpy = fit_temperature((3.0 * logits).float().numpy(), labels.numpy())
    assert from_numpy == pytest.approx(fit_temperature(3.0 * logits, labels), rel=1e-4)
    scaled = apply_temperature(logits.numpy(), 2.0)
    assert isinstance(scaled, np.ndarray)
    np.testing.assert_allclose(scaled, logits.numpy() / 2.0)


def test_perfectly_separated_data_stays_finite():
    # Every validation prediction right: NLL keeps falling as T -> 0; the fit must stop at the bound, not at 0/NaN.
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]] * 10)
    labels = torch.tensor([0, 1] * 10)
    temperature = fit_temperature(logits, labels)
    assert 0 < temperature < 1


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((4,)), np.zeros(4), "shape"),
        (np.zeros((4, 1)), np.zeros(4), "K >= 2"),
        (np.zeros((4, 2)), np.zeros(3), "labels must have shape"),
        (np.zeros((4, 2)), np.array([0, 1, 2, 0]), r"\[0, 2\)"),
        (np.full((2, 2), np.nan), np.zeros(2), "finite"),
    ],
)
def test_bad_inputs(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, labels)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), True])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.zeros((2, 2)), temperature)
