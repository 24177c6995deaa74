"""`python -m ember.evaluation ARGS`: lm-evaluation-harness's own command line (`lm_eval ARGS`)
with the "ember" model registered, e.g.

    python -m ember.evaluation run --model ember --model_args load=CKPT --tasks my_task --include_path tasks/

lm-eval 0.4.13 finds models only in its own table or among classes already imported, and has no
plugin hook an installed package could use, so a plain `lm_eval --model ember` cannot see ember;
this entry point imports ember's class first and then hands over to lm-eval unchanged.
"""

from __future__ import annotations


def main() -> None:
    import sys

    try:
        import ember.evaluation.harness  # noqa: F401 - registers the "ember" model
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        sys.exit(f"ember-lm-eval: needs lm-evaluation-harness ({err}); pip install 'ember[eval]'")
    ember.evaluation.harness.offline()
    cli_evaluate()


if __name__ == "__main__":
    main()
