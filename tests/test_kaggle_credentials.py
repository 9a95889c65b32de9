"""Credentials as Kaggle issues them today, through the real client against the stand-in: an API
token (KAGGLE_API_TOKEN, or ~/.kaggle/access_token), which the client checks with Kaggle's token
introspection, and the legacy key (kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY). A refused
token is one line that names both ways."""

import pytest

pytest.importorskip("kaggle")

from kaggle_stand_in import (INTROSPECT, SAVE, FakeKaggle, kaggle_env,  # noqa: E402
                             render_chain, run_here)

TOKEN = "KGAT_3f2a9c1d7e5b4a6f8091"
SUBMISSION = b"id_code,sirna\nHEPG2-08_1_B03,17\n"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return render_chain(tmp_path_factory, stages=1)


@pytest.fixture
def kaggle(server):
    fake = FakeKaggle(server)
    fake.outputs["rcic-b0-submit"] = {"submission.csv": SUBMISSION}
    return fake


@pytest.fixture
def cli_with(server, tmp_path, monkeypatch, capsys):
    """rcic-chain in this process, with the credentials `kaggle_env` is given."""
    def cli(*args, **credentials):
        env = kaggle_env(server, tmp_path, **credentials)
        return run_here(monkeypatch, capsys, env, *args)
    return cli


def senders(server):
    """Who sent each API call but the token checks (downloads and uploads go to signed URLs,
    without credentials)."""
    return {who for method, who in server.users
            if method != INTROSPECT and not method.startswith(("GET ", "PUT "))}


def test_push_status_and_submit_work_with_an_api_token_alone(server, kaggle, cli_with,
                                                            chain_dir):
    server.tokens[TOKEN] = "jdoe"
    for command in (["push", chain_dir, "--poll-seconds", "0.001"], ["status", chain_dir],
                    ["submit", chain_dir, "--poll-seconds", "0.001"]):
        result = cli_with(*command, credentials=False, token=TOKEN)
        assert result.returncode == 0, (command, result.stderr)
    assert "private score 0.98127" in result.stdout
    assert kaggle.pushes("rcic-b0-stage-01") == kaggle.pushes("rcic-b0-submit") == 1
    # Every call carried the token; the client asked Kaggle whose it is first.
    assert senders(server) == {f"token:{TOKEN}"}
    assert {b["token"] for b in server.bodies(INTROSPECT)} == {TOKEN}


def test_a_token_in_the_access_token_file_works_too(server, kaggle, cli_with, chain_dir,
                                                    tmp_path):
    server.tokens[TOKEN] = "jdoe"
    (tmp_path / ".kaggle").mkdir()                  # HOME is tmp_path (kaggle_env)
    (tmp_path / ".kaggle" / "access_token").write_text(TOKEN + "\n")
    result = cli_with("push", chain_dir, "--poll-seconds", "0.001", credentials=False)
    assert result.returncode == 0, result.stderr
    assert senders(server) == {f"token:{TOKEN}"}


def test_the_legacy_key_still_works(server, kaggle, cli_with, chain_dir):
    result = cli_with("push", chain_dir, "--poll-seconds", "0.001")
    assert result.returncode == 0, result.stderr
    assert senders(server) == {"key:jdoe"} and server.bodies(INTROSPECT) == []


WAYS = ("an API token (kaggle.com > Settings > API > Generate New Token) in KAGGLE_API_TOKEN or "
        "~/.kaggle/access_token, or the legacy key kaggle.json in ~/.kaggle/ or "
        "$KAGGLE_CONFIG_DIR (or KAGGLE_USERNAME and KAGGLE_KEY)")


@pytest.mark.parametrize("where", ["environment", "file"])
@pytest.mark.parametrize("legacy_key_too", [False, True])
def test_a_refused_token_is_one_line_naming_both_ways(server, kaggle, cli_with, chain_dir,
                                                      tmp_path, where, legacy_key_too):
    # Kaggle does not know the token (expired or revoked): introspection says inactive. With a
    # legacy key beside it the client would fall back to the key for itself but still send the
    # token with every call, so rcic refuses either way.
    token = {"token": TOKEN}
    if where == "file":
        (tmp_path / ".kaggle").mkdir()
        (tmp_path / ".kaggle" / "access_token").write_text(TOKEN)
        token = {}
    for command in ("push", "status", "submit"):
        result = cli_with(command, chain_dir, credentials=legacy_key_too, **token)
        place = "KAGGLE_API_TOKEN" if where == "environment" else "~/.kaggle/access_token"
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"rcic-chain: error: Kaggle refused the API token in {place} (expired or revoked?): "
            f"give {WAYS}, and remove the refused token")
    assert SAVE not in server.methods() and senders(server) == set()


def test_no_credentials_at_all_names_both_ways(server, cli_with, chain_dir):
    result = cli_with("status", chain_dir, credentials=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"rcic-chain: error: no Kaggle credentials: give {WAYS}"
    assert server.requests == []
