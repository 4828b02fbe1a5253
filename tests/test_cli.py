"""minidiff/cli.py: diffusers' flag spellings are read as ours (a command line copied from the diffusers README runs)."""

import pytest

from minidiff.cli import DIFFUSERS_FLAGS, ArgumentParser, translate_flags


def parser():
    p = ArgumentParser(prog="finetune.py")
    p.add_argument("--instance-dir")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--no-prior", action="store_true")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--fit", default="pad")
    p.add_argument("--steps", type=int, default=10)
    return p


def test_diffusers_spellings_parse_like_ours():
    args = parser().parse_args(
        [
            "--instance_data_dir",
            "dog",
            "--with_prior_preservation",
            "--train_text_encoder",
            "--learning_rate=1e-3",
            "--center_crop",
            "--max_train_steps",
            "7",
        ]
    )
    assert (args.instance_dir, args.train_text_encoder, args.no_prior) == ("dog", True, False)
    assert (args.lr, args.fit, args.steps) == (1e-3, "crop", 7)
    assert vars(args) == vars(
        parser().parse_args(
            ["--instance-dir", "dog", "--train-text-encoder", "--lr", "1e-3", "--fit", "crop", "--steps", "7"]
        )
    )


def test_values_and_unknown_flags_are_left_alone(capsys):
    known = {"--instance-dir": None}
    assert translate_flags(["--instance-dir", "my_dir", "--not_ours"], known) == [
        "--instance-dir",
        "my_dir",
        "--not_ours",
    ]
    with pytest.raises(SystemExit) as e:  # a flag neither we nor diffusers spell: the usual one-line error
        parser().parse_args(["--not_a_flag"])
    assert e.value.code == 2 and "--not_a_flag" in capsys.readouterr().err


def test_every_alias_names_a_finetune_flag():
    import finetune

    known = finetune.build_parser()._option_string_actions
    for flag, ours in DIFFUSERS_FLAGS.items():
        assert not ours or ours[0] in known, flag
