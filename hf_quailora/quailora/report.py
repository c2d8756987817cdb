"""What `quailora_init` did: per-layer calibrated and Frobenius errors, as a table, JSON or a one-line summary.

Example:

```python
report = quailora_init(model, calibration)
print(report.summary())
print(report.to_markdown(max_rows=7))
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .calibration import GramStatistics


@dataclass
class LayerReport:
    """Errors of one layer, per calibration token (calibrated) and in Frobenius norm (uncalibrated)."""

    name: str
    quantization: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    calibrated_error_qlora: float | None
    calibrated_error_svd: float | None
    calibrated_error_result: float | None
    frobenius_error_qlora: float
    frobenius_error_svd: float | None
    frobenius_error_result: float
    seconds: float

    @property
    def relative_calibrated_error(self) -> float | None:
        """Calibrated error of the result over QLoRA's (B = 0); below 1 is better."""
        if self.calibrated_error_result is None or not self.calibrated_error_qlora:
            return None
        return self.calibrated_error_result / self.calibrated_error_qlora


@dataclass
class QuAILoRAReport:
    """What `quailora_init` did: one `LayerReport` per initialised layer, and what it skipped."""

    solver: str
    num_tokens: int
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    solve_seconds: float = 0.0
    streaming: str = "off"
    gram_statistics: GramStatistics | None = field(default=None, repr=False)

    def totals(self) -> dict[str, float]:
        """Errors summed over layers (calibrated errors only when calibration ran)."""
        keys = [k for k in LayerReport.__dataclass_fields__ if "error" in k]
        out = {}
        for key in keys:
            values = [getattr(layer, key) for layer in self.layers]
            if values and all(v is not None for v in values):
                out[key] = float(sum(values))
        return out

    def to_dict(self) -> dict:
        """JSON-ready dict (without the Gram matrices)."""
        return {
            "solver": self.solver,
            "num_tokens": self.num_tokens,
            "calibration_seconds": self.calibration_seconds,
            "solve_seconds": self.solve_seconds,
            "streaming": self.streaming,
            "totals": self.totals(),
            "skipped": dict(self.skipped),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_markdown(self, max_rows: int | None = None) -> str:
        """A per-layer Markdown table: errors relative to QLoRA's B = 0 start (1.0 = no improvement)."""

        def rel(value, base):
            return "n/a" if value is None or not base else f"{value / base:.3f}"

        lines = [
            "| layer | quant | rank | calib. SVD | calib. result | Frob. SVD | Frob. result |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for layer in self.layers[:max_rows]:
            lines.append(
                f"| {layer.name} | {layer.quantization} | {layer.rank} "
                f"| {rel(layer.calibrated_error_svd, layer.calibrated_error_qlora)} "
                f"| {rel(layer.calibrated_error_result, layer.calibrated_error_qlora)} "
                f"| {rel(layer.frobenius_error_svd, layer.frobenius_error_qlora)} "
                f"| {rel(layer.frobenius_error_result, layer.frobenius_error_qlora)} |"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"| … {len(self.layers) - max_rows} more layers | | | | | | |")
        totals = self.totals()
        if totals:
            lines.append(
                f"| **all layers** | | | {rel(totals.get('calibrated_error_svd'), totals.get('calibrated_error_qlora'))} "
                f"| {rel(totals.get('calibrated_error_result'), totals.get('calibrated_error_qlora'))} "
                f"| {rel(totals.get('frobenius_error_svd'), totals['frobenius_error_qlora'])} "
                f"| {rel(totals['frobenius_error_result'], totals['frobenius_error_qlora'])} |"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        totals = self.totals()
        text = (
            f"QuAILoRA ({self.solver}): {len(self.layers)} layers initialised, {len(self.skipped)} skipped, "
            f"{self.num_tokens} calibration tokens; calibration {self.calibration_seconds:.1f} s, "
            f"solves {self.solve_seconds:.1f} s"
        )
        if "calibrated_error_result" in totals and totals.get("calibrated_error_qlora"):
            text += "; calibrated error vs QLoRA start: "
            if "calibrated_error_svd" in totals:
                text += f"SVD start {totals['calibrated_error_svd'] / totals['calibrated_error_qlora']:.3f}, "
            text += f"result {totals['calibrated_error_result'] / totals['calibrated_error_qlora']:.3f}"
        return text
