"""Errors users can act on, and the exit codes the CLIs turn them into."""


class PipelineError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""

    exit_code = 2


class ValidationFailed(PipelineError):
    """Numbers disagree with the reference beyond tolerance."""

    exit_code = 3


class BackendUnavailable(PipelineError):
    """A needed package or device is missing (TensorRT, pycuda, a GPU)."""

    exit_code = 4


class EngineMismatch(PipelineError):
    """An engine built for another GPU or TensorRT version."""

    exit_code = 5


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the job kept and how to go on."""


EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_SOME_INPUTS_FAILED = 6
EXIT_INTERRUPTED = 130
