# mmseg's default runtime (default_scope='mmseg', logging, visualizer, env) plus the hook
# that writes the per-dataset prompt checkpoint: <work_dir>/prompts.safetensors (latest)
# and <work_dir>/prompts/iter_<n>.safetensors at every checkpoint interval. tools/train.py
# adds the same hook to any config; listing it here makes mmseg's own train script write
# prompt checkpoints too.
_base_ = ['mmseg::_base_/default_runtime.py']

custom_hooks = [dict(type='promptmatch.PromptCheckpointHook')]
