"""NaFlex target sizes (the patch-budget search) against the specification and transformers,
over many random image sizes."""

from __future__ import annotations

import pytest

from glm5v_kernels.data import NaFlexProcessor
from glm5v_kernels.data import reference as R

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 6000), width=st.integers(1, 6000), patch_size=st.sampled_from([7, 14, 16]),
       merge_size=st.sampled_from([1, 2]), budget=st.integers(4, 4096))
def test_target_size_matches_reference(height, width, patch_size, merge_size, budget):
    processor = NaFlexProcessor(patch_size=patch_size, max_num_patches=budget, merge_size=merge_size)
    out_height, out_width = processor.target_size(height, width)
    assert (out_height, out_width) == R.target_size(height, width, patch_size, budget, merge_size)
    unit = patch_size * merge_size
    assert out_height % unit == 0 and out_width % unit == 0 and out_height >= unit and out_width >= unit
    assert (out_height // patch_size) * (out_width // patch_size) <= budget


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000), patch_size=st.sampled_from([14, 16]),
       budget=st.integers(1, 2048))
def test_target_size_matches_transformers(height, width, patch_size, budget):
    siglip2 = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    expected = siglip2.get_image_size_for_max_num_patches(height, width, patch_size, budget)
    assert NaFlexProcessor(patch_size=patch_size, max_num_patches=budget).target_size(height, width) == expected
