"""lm-eval's own CLI with the `qrobust` model registered and qrobust's tasks on the include path:

    python -m qrobust.lm_eval run --model qrobust --model_args model=tiny-ar,method=gptq,bits=4 \
        --tasks qrobust_humaneval --limit 5 --confirm_run_unsafe_code --output_path out/

Every lm-eval argument works as with `lm_eval`; --include_path defaults to qrobust's task folder.
"""
import sys

from qrobust.lm_eval import TASKS_DIR


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    commands = {"run", "ls", "validate"}
    if len(sys.argv) > 1 and not any(a == "--include_path" or a.startswith("--include_path=") for a in sys.argv) \
            and (sys.argv[1] in commands or sys.argv[1].startswith("-")):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
