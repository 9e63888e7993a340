"""The errors qcore raises. Every message says what is wrong and what is allowed."""

from __future__ import annotations


class QcoreError(Exception):
    """Base class of every error qcore raises on purpose."""


class PluginError(QcoreError):
    """A plugin failed to load, declared a hook that does not exist, or clashed with another."""


class UnknownBackendError(QcoreError, KeyError):
    """A backend name that no installed plugin registers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(QcoreError):
    """The backend is installed but cannot run here (missing kernels or optional packages)."""


class AnnotationConflictError(QcoreError):
    """An annotator tried to change or remove an annotation that an earlier annotator made."""


class PrepareError(QcoreError):
    """The annotations cannot be turned into observers (bad sharing, integer tensors, ...)."""


class ConvertError(QcoreError):
    """The prepared model cannot be converted to quantize/dequantize ops."""


class MutableBufferFoldError(ConvertError, ValueError):
    """A buffer ``fold_quantize_into_mutable_buffers`` cannot store as integers (a ValueError too,
    as torchao raises)."""


class CalibrationError(QcoreError, ValueError):
    """Calibration data the observers cannot use (NaN or inf values)."""


class NotExportedError(QcoreError, TypeError):
    """A verb that needs an exported aten graph got something else."""


class QuantizeError(QcoreError):
    """``qcore.quantize``, ``save`` or ``load`` cannot do what was asked (the message says why)."""


class ExportFailedError(QuantizeError):
    """``torch.export`` could not capture the model."""


class CalibrationShapeError(QuantizeError, ValueError):
    """A calibration batch whose shapes do not match the example inputs."""


class CliError(Exception):
    """A user error the command reports in one line (exit code 1)."""
