"""The library side of the scripts under ``tools/``: each ``promptmatch.tools.<name>`` holds the
code of ``tools/<name>.py`` and its ``main(argv=None)``; the script only calls it.

Modules: :mod:`.latency` (inference latency side by side), :mod:`.cost` (inference, training
step, memory and parameters side by side), :mod:`.bank_serving` (a prompt bank against one
model per dataset), :mod:`.param_report` (parameter budget and checkpoint sizes),
:mod:`.quickstart` (a one-minute tour), :mod:`.spm_study` (what SPM's matchers do).
"""
