"""Test setup for tests/ and benchmarks/tests/: invariant checks on, the interpreter on CPU-only
machines, GPU tests skipped (with the reason shown) where there is no GPU, and the quick tier:
`pytest -m "not slow"` leaves out the tests in SLOW (see below)."""

import os
import tempfile

os.environ.setdefault("MKCOMPILER_DEBUG", "1")  # every pass runs its invariant check
# Compile cache (mkcompiler/tools/cache.py) and generated kernels in a directory of this test session:
# tests never read entries an earlier run (or other code) left behind.
os.environ.setdefault("MKCOMPILER_CACHE", tempfile.mkdtemp(prefix="mkcompiler-tests-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import mkcompiler  # noqa: E402,F401  (chooses the Triton interpreter when there is no GPU)

# The slow tier: tests (by file, and function name or "*" for the whole file) that take seconds
# each on the 2-core CI machine. The quick tier (`-m "not slow"`) still runs at least one test of
# every library module; the full suite (CI) runs everything.
SLOW = {
    "benchmarks/tests/test_decode_latency_cli.py": {"*"},
    "benchmarks/tests/test_decode_stages_cli.py": {"*"},
    "benchmarks/tests/test_prefill_matmul_cli.py": {"*"},
    "benchmarks/tests/test_tp_throughput_cli.py": {"*"},
    "tests/test_fuzz.py": {"*"},
    "tests/test_compile_speed.py": {"test_hf_queue_equals_the_networkx_passes"},
    "tests/test_canonicalize_norms.py": {
        "test_canonical_spellings_match_eager",
        "test_every_spelling_compiles_like_the_canonical_one",
    },
    "tests/test_gpu_fuzz.py": {"*"},
    "tests/test_gluon_codegen.py": {
        "test_a_fallback_gets_the_triton_backends_own_tiles",
        "test_decode_mlp_compiles_for_sm90_without_spills",
        "test_plan_walks_agree_and_the_tma_table_is_the_loader_walk",
        "test_weights_are_rebound_to_stacked_buffers",
    },
    "tests/test_gluon_prefill.py": {
        "test_a_tiny_llama_prefill_keeps_only_norms_and_attention_off_the_backend",
        "test_large_m_kernels_compile_for_sm90_without_spills",
    },
    "tests/test_gluon_small_ops.py": {
        "test_a_llama_decode_step_names_none_of_these_families",
        "test_graphs_of_these_families_compile_for_sm90_without_spills",
        "test_greedy_steps_of_a_tiny_llama_give_eager_tokens",
    },
    "tests/test_gluon_attention.py": {
        "test_attention_tiles_run_on_the_cpu_give_eager_outputs",
        "test_decode_attention_compiles_for_sm90_without_spills",
        "test_llama_decode_step_runs_its_attention_on_gluon",
    },
    "benchmarks/tests/test_gluon_decode_chain_cli.py": {"test_dry_run_generates_both_kernels"},
    "tests/test_gpu_determinism.py": {"*"},
    "benchmarks/tests/test_soak_cli.py": {"test_smoke_run_passes_and_writes_its_figures"},
    "benchmarks/tests/test_sanitize_cli.py": {"*"},
    "tests/test_hf_models.py": {
        "test_hf_batch2_next_token",
        "test_hf_greedy_fp32",
        "test_hf_teacher_forced_bf16",
        "test_other_families_compile_through_the_generic_pipeline",
    },
    "tests/test_offline_sm90.py": {
        "test_llama_kernels_compile_for_sm90_without_spills",
        "test_mlp_block_compiles_for_sm90_without_spills",
        "test_prefill_warpgroup_mmas_are_not_serialized",
        "test_profile_and_wait_variants_compile_for_sm90",
    },
    "tests/test_tp_kernel.py": {
        "test_compile_with_tensor_parallel_in_one_process",
        "test_gathers_and_reduces_over_four_ranks_with_static_schedules",
        "test_post_attention_exchange_kernels_equal_eager_and_the_vm",
        "test_sharded_llama_kernel_equals_eager_and_the_vm",
        "test_tp_rank_kernels_compile_for_sm90_without_spills",
    },
    "tests/test_llama.py": {
        "test_batched_decode_matches_eager",
        "test_compile_leaves_model_state_alone",  # the last quick user of the module's compiled Llama (13 s)
        "test_decode_step_below_max_batch",
        "test_decode_writes_only_its_slot",
        "test_generate_script",
        "test_greedy_generation_matches_eager",
        "test_greedy_loop_generates_eager_tokens_with_launches_only",
        "test_kv_cache_matches_eager",
        "test_logits_match_eager",
    },
    "tests/test_cli.py": {"test_inspect_transformer_block_prints_every_section"},
    "tests/test_llama_spellings.py": {
        "test_greedy_loop_of_the_written_spelling_gives_eager_tokens",
        "test_written_compiles_like_canonical_and_matches_eager",
    },
    "tests/test_call_overhead.py": {"test_the_spellings_decode_calls_run_within_3_percent_on_a_gpu"},
    "tests/test_fuse_norm_fast.py": {
        "test_both_paths_compile_for_sm90_without_spills",
        "test_layer_norm_in_loop",
        "test_rms_norm_in_loop",
    },
    "tests/test_early_weights.py": {
        "test_decode_mlp_matches_eager",
        "test_llama_decode_steps_match_eager",
    },
    "tests/test_tp.py": {
        "test_an_exchange_tile_waits_only_for_the_rows_it_sends",
        "test_post_attention_exchange_equals_the_unsharded_model",
        "test_random_sharded_dags_never_deadlock_across_ranks",
        "test_random_sharded_modules_equal_the_unsharded_model",
        "test_sharded_hugging_face_model_with_biases_and_tied_head",
        "test_sharded_llama_equals_the_unsharded_model",
    },
    "tests/test_mixed_step.py": {
        "test_mixed_step_matches_eager_and_writes_only_its_slots",
        "test_tensor_parallel_mixed_step_equals_the_unsharded_model",
    },
    "tests/test_attention.py": {"test_gqa_decode_packs_the_group_into_one_tile"},
    "tests/test_vm.py": {
        "test_check_static_accepts_exactly_the_schedules_the_vm_finishes",
        "test_random_tilings_of_an_mlp_match_eager",
    },
    "tests/test_build_dag.py": {"test_region_helpers_match_their_element_by_element_versions"},
    "tests/test_fuse_cat.py": {"test_tiny_llama_decode_has_one_stage_between_qkv_and_attention"},
    "tests/test_cache.py": {"test_llama_decode_hits_and_updates_its_kv_cache"},
    "tests/test_dynamo_backend.py": {
        "test_entry_point_names_the_backend_without_importing_mkcompiler",
        "test_hf_generate_static_cache_gives_eager_tokens",
        "test_import_mkcompiler_registers_the_backend_lazily",
        "test_unsupported_op_runs_eagerly_inside_the_graph",
    },
    "tests/test_dynamo_mutation.py": {
        "test_attention_without_dropout_is_not_a_random_op",
        "test_hf_prefill_with_its_counter_an_input_gives_eager_tokens",
    },
    "tests/test_dynamo_overhead.py": {
        "test_an_hf_decode_step_is_one_launch_and_copies_no_bound_tensor",
        "test_python_calls_of_a_call_do_not_grow_with_the_bound_tensors",
    },
    "tests/test_new_user.py": {"test_factory_file_path_imports_its_siblings_from_another_directory"},
    "tests/test_serve.py": {
        "test_greedy_equals_each_request_alone_with_preemption",
        "test_megakernel_steps_equal_eager",
    },
    # the spelling galleries (the quick tier keeps one test of each module: rank-5 views, shared
    # masks, batched pairs, the complex table)
    "tests/test_canon_rope.py": {
        "test_every_spelling_compiles_like_the_canonical_one",
        "test_rotated_k_in_the_cache_and_q_in_attention_compile_like_rotate_half",
    },
    "tests/test_canon_attention.py": {
        "test_decode_spellings_compile_as_sdpa",
        "test_prefill_spellings_compile_as_sdpa",
    },
    "tests/test_serve_steps.py": {
        "test_a_compiled_step_sends_only_the_sampled_rows_to_the_lm_head",
        "test_our_llama_megakernel_steps_are_few_and_equal_eager",
    },
    "tests/test_paged_attention.py": {
        "test_engine_megakernels_attend_through_the_page_tables",
        "test_paged_kernel_compiles_for_sm90_without_spills",
    },
    "benchmarks/tests/test_serve_throughput_cli.py": {"test_tiny_run_writes_a_row_per_engine"},
    "tests/test_profiling.py": {"test_gantt_and_trace_scale_to_a_gpu_sized_profile"},
    "tests/test_tile_order.py": {"test_grouped_order_reaches_the_queue_and_keeps_results"},
    "tests/test_gluon_profile.py": {"test_profiling_variant_compiles_for_sm90_without_spills"},
    "tests/test_gluon_plan.py": {"test_llama_walks_agree_and_the_ring_completes"},
    "tests/test_threaded_interp.py": {"test_static_schedule_runs_concurrently"},
    "tests/test_fallback.py": {"test_state_read_by_an_eager_op_is_written_after_it"},
    "tests/test_models.py": {"test_repeated_calls_with_fresh_inputs"},
    "tests/test_launch_safety.py": {"test_two_threads_with_two_megakernels"},
}


def pytest_addoption(parser):
    """The GPU fuzz campaign's knobs (tests/test_gpu_fuzz.py); each also read from an environment variable."""
    group = parser.getgroup("mkcompiler fuzz", "the GPU fuzz campaign (tests/test_gpu_fuzz.py)")
    env = os.environ.get
    group.addoption("--fuzz-seed", type=int, default=int(env("MKCOMPILER_FUZZ_SEED", "0")), help="campaign seed")
    group.addoption(
        "--fuzz-models", type=int, default=int(env("MKCOMPILER_FUZZ_MODELS", "200")), help="random models to run"
    )
    group.addoption(
        "--fuzz-budget-s",
        type=float,
        default=float(env("MKCOMPILER_FUZZ_BUDGET_S", "240")),
        help="no model starts after this many seconds (reducing a failure has a budget of its own)",
    )
    group.addoption(
        "--fuzz-jobs",
        type=int,
        default=int(env("MKCOMPILER_FUZZ_JOBS", str(max(0, min(12, (os.cpu_count() or 1) - 3))))),
        help="processes that compile the next models' kernels ahead (0: none)",
    )


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        path = os.path.relpath(str(item.path), str(config.rootpath)).replace(os.sep, "/")
        names = SLOW.get(path, ())
        if "*" in names or getattr(item, "originalname", item.name) in names:
            item.add_marker(slow)
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
