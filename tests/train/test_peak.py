"""The peak FLOP/s behind MFU: measured on CPU, from the datasheet on accelerators."""
import types

from pathways.train import peak


def test_cpu_peak_is_measured_once_and_an_override_wins(monkeypatch):
  monkeypatch.delenv('PATHWAYS_PEAK_FLOPS', raising=False)
  value, source = peak.peak_flops()
  assert value > 1e8 and source == 'measured float32 matmul'
  assert peak.peak_flops()[0] == value  # cached: one measurement per process
  monkeypatch.setenv('PATHWAYS_PEAK_FLOPS', '2e12')
  assert peak.peak_flops() == (2e12, 'PATHWAYS_PEAK_FLOPS')


def test_accelerator_peaks_come_from_the_datasheet(monkeypatch):
  monkeypatch.delenv('PATHWAYS_PEAK_FLOPS', raising=False)
  h100 = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H100 80GB HBM3')
  assert peak.peak_flops(h100, 'bfloat16') == (989e12, 'datasheet H100 bfloat16')
  assert peak.peak_flops(h100, 'float32')[0] == 494e12  # XLA's default: TF32
  unknown = types.SimpleNamespace(platform='gpu', device_kind='Mystery 9000')
  value, why = peak.peak_flops(unknown)
  assert value is None and 'PATHWAYS_PEAK_FLOPS' in why
