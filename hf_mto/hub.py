"""The Hub is never allowed to cost a run or a checkpoint: `ResilientHubMixin` makes a Trainer's Hub integration
report an unreachable Hub (offline, network down, timeouts, server errors) as a warning naming what stays saved
locally and the command that pushes it later, and retry at the next checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

try:  # the HTTP client of huggingface_hub: httpx2 from version 2, httpx before
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

logger = logging.getLogger(__name__)

# Hub failures that a later retry can fix: offline mode, network down, timeouts, server errors (see
# `hub_unreachable`); anything else (no token, no write access, bad repo id, a full disk) is raised.
HUB_UNREACHABLE = (ConnectionError, TimeoutError, TransportError, HfHubHTTPError)


def hub_unreachable(error: BaseException) -> bool:
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return status is None or status >= 500 or status == 429
    return isinstance(error, HUB_UNREACHABLE)


class ResilientHubMixin:
    """For `Trainer` subclasses: an unreachable Hub is a warning, never an error that loses a run (see the module).
    A pushed checkpoint brings its `README.md` (the model card) along."""

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies only the weights, config and processor of the checkpoint into output_dir and uploads
        # output_dir: bring the checkpoint's card along, when the push happens (the Trainer's own conditions).
        in_progress = getattr(self, "push_in_progress", None)
        busy = in_progress is not None and not in_progress.is_done()
        card = os.path.join(checkpoint_folder, "README.md")
        if (
            self.is_world_process_zero()
            and self.args.hub_strategy != "end"
            and (self.args.hub_always_push or not busy)
            and os.path.isfile(card)
        ):
            shutil.copy(card, os.path.join(self.args.output_dir, "README.md"))
        if (
            self.is_world_process_zero()
            and self.args.hub_strategy != "end"
            and getattr(self, "hub_model_id", None) is None
        ):
            self.init_hf_repo()  # the Hub was unreachable at start; try again, once per checkpoint
            if self.hub_model_id is None:
                return
        earlier = set(getattr(getattr(self, "push_in_progress", None), "jobs", None) or [])
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        except HUB_UNREACHABLE as error:
            self._hub_failed(f"Pushing {checkpoint_folder}", error)
            return
        # The uploads run in the background and their errors would be dropped silently: report those of this push.
        for job in getattr(self.push_in_progress, "jobs", None) or []:
            if job not in earlier:
                job.add_done_callback(partial(self._report_upload, checkpoint_folder))

    def _hub_failed(self, action: str, error: BaseException) -> None:
        logger.warning(
            "%s on the Hub (%s) failed: %s: %s. Training goes on and everything stays saved locally in %s; push it "
            "later with `hf upload %s %s`.",
            action,
            self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            type(error).__name__,
            error,
            self.args.output_dir,
            self.args.hub_model_id or "<user>/<repo>",
            self.args.output_dir,
        )

    def _report_upload(self, checkpoint_folder: str, job) -> None:
        if not job.cancelled() and job.exception() is not None:  # in the background: any failure is reported
            self._hub_failed(f"Uploading {checkpoint_folder}", job.exception())

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """The Trainer's, except that an unreachable Hub (offline, network down, server error) is a warning instead
        of an error before training starts: pushing is retried at each checkpoint and at the end. Errors that no
        retry can fix (no token, no write access, a malformed repo id) still stop the run before it trains."""
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:
            if not hub_unreachable(error):
                raise
            self.hub_model_id = None
            self._hub_failed("Creating the repository", error)

    def push_to_hub(self, *args, **kwargs):
        """The Trainer's `push_to_hub`, which saves the model and its card locally first; an unreachable Hub is
        reported and returns None instead of raising, so the end of a run never loses what it trained."""
        if self.is_world_process_zero() and getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=kwargs.get("token"), private=kwargs.get("private"))
        if self.hub_model_id is None:  # still unreachable: save locally, as the push would have, and say so
            self.save_model(_internal_call=True)
            card_kwargs = {
                k: v
                for k, v in kwargs.items()
                if k not in ("commit_message", "blocking", "token", "revision", "private")
            }
            self.create_model_card(**card_kwargs)
            self._hub_failed("Pushing the final model", ConnectionError("the repository could not be created"))
            return None
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as error:
            if not hub_unreachable(error):
                raise
            self._hub_failed("Pushing the final model", error)
            return None


__all__ = ["HUB_UNREACHABLE", "ResilientHubMixin", "hub_unreachable"]
