"""What a fine-tuning job needs of the install it is submitted to."""

from __future__ import annotations

import pytest

from appliance.errors import TrainingNotInstalled
from appliance.finetune import TRAINING_PACKAGES, require_training_stack


def test_the_test_install_has_the_training_stack():
    require_training_stack()  # make install installs the `train` extra


def test_an_install_without_it_is_told_what_is_missing_and_how_to_get_it():
    with pytest.raises(TrainingNotInstalled) as refused:
        require_training_stack((*TRAINING_PACKAGES, "appliance_no_such_package"))
    assert refused.value.status == 503 and refused.value.code == "training_not_installed"
    assert "(missing: appliance_no_such_package)" in refused.value.message
    assert "'appliance[train]'" in refused.value.message and "--with-training" in refused.value.message
