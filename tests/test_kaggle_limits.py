"""The dry run holds Kaggle's limits: a kernel that leaves more than the output cap in its
working folder, or reaches for the network with the internet off, fails it with one line."""
import os
import socket
import threading

import pytest

from rcic.errors import UserError
from rcic.kaggle import chain, limits
from rcic.kaggle.local import run_chain, run_script


def one_stage_chain(tmp_path, code):
    """A rendered one-stage chain whose stage script is replaced by `code`."""
    spec = chain.ChainSpec(owner="local", prefix="rcic-limits", stages=1, budget="1m")
    folders = chain.render_chain(spec, tmp_path / "kernels")
    (folders[0] / chain.STAGE_SCRIPT).write_text(code)
    return folders[:1]


def run(tmp_path, data, code, **kwargs):
    return run_chain(one_stage_chain(tmp_path, code), tmp_path / "runs", data, None, 60.0,
                     echo=lambda line: None, **kwargs)


WRITE = ("import os\n"
         "open('big.bin', 'wb').write(bytes(3_000_000))\n"
         "open(os.path.join(os.environ['RCIC_SCRATCH'], 'scratch.bin'), 'wb')"
         ".write(bytes(5_000_000))\n")


def test_a_kernel_past_the_output_cap_fails_the_dry_run(tmp_path, tiny_data):
    with pytest.raises(UserError) as err:
        run(tmp_path / "a", tiny_data, WRITE, output_limit=limits.parse_size("2MB"))
    message = str(err.value)
    assert "\n" not in message
    assert "stage-01 left 3.00 MB in its working folder, over the output limit of 2.00 MB" \
        in message and "Kaggle would drop its output" in message
    # Under the cap it passes; the scratch disk is not output and does not count.
    result = run(tmp_path / "b", tiny_data, WRITE, output_limit=limits.parse_size("4MB"))
    assert result[0]["output_bytes"] == 3_000_000


def outward_address():
    """This machine's address on its way out (no packet is sent), or None without a network."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 9))
        return probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()


@pytest.fixture
def server_address():
    """A server on this machine's own network address: reachable like a download site."""
    host = outward_address()
    if host is None or host.startswith("127."):
        pytest.skip("this machine has no network address to play a download site")
    server = socket.create_server(("0.0.0.0", 0))
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    yield host, server.getsockname()[1]
    server.close()


def test_a_kernel_that_opens_a_socket_with_the_internet_off_fails(tmp_path, tiny_data,
                                                                   server_address):
    prefix, why_not = limits.offline_prefix()
    if prefix is None:
        pytest.skip(f"no network namespace here: {why_not}")
    code = ("import socket\n"
            f"socket.create_connection({server_address!r}, timeout=5)\n"
            "print('connected')\n")
    # The server is reachable from an ordinary process...
    script = tmp_path / "probe.py"
    script.write_text(code)
    lines = []
    status, _, _ = run_script(script, tmp_path, tmp_path, 30, tmp_path / "log", lines.append)
    assert status == 0 and lines == ["connected"]
    # ...but not from a kernel whose metadata says the internet is off.
    with pytest.raises(UserError) as err:
        run(tmp_path / "chain", tiny_data, code)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("stage-01 tried to use the network, but its internet is off")
    assert "Network is unreachable" in (tmp_path / "chain" / "runs" / "stage-01" /
                                        "kernel.log").read_text()
    # A kernel that fails otherwise is not blamed on the network, even if something in it
    # warned earlier that it could not reach one.
    with pytest.raises(UserError) as err:
        run(tmp_path / "other", tiny_data, "import urllib.request, warnings\n"
            "try:\n    urllib.request.urlopen('http://example.com', timeout=5)\n"
            "except OSError as e:\n    warnings.warn(f'no update check: {e}')\n"
            "raise SystemExit('bad settings')\n")
    assert str(err.value).startswith("stage-01 ended in ERROR (exit status 1)")


def test_output_limit_sizes_and_bad_input(capsys):
    assert limits.parse_size("20GB") == 20 * 10**9
    assert limits.parse_size("1.5m") == 1_500_000 and limits.parse_size("512") == 512
    from rcic.cli.chain import main
    assert main(["local", "--stages", "1", "--budget", "1m", "--output-limit", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output-limit 'lots' is not a size" in err


def test_where_the_os_refuses_a_namespace_the_run_says_so_once_and_goes_on(tmp_path, tiny_data,
                                                                          monkeypatch):
    # Refused as a container without the right to make namespaces refuses it: an `unshare`
    # that fails the way util-linux's does there.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "unshare").write_text("#!/bin/sh\n"
                                  "echo 'unshare: unshare failed: Operation not permitted' >&2\n"
                                  "exit 1\n")
    (fake / "unshare").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    lines = []
    results = run_chain(one_stage_chain(tmp_path, "print('ran')\n"), tmp_path / "runs", tiny_data,
                        None, 60.0, echo=lines.append)
    notices = [line for line in lines if "notice" in line]
    assert notices == ["rcic-chain local: notice: the OS refused a network namespace (unshare: "
                       "unshare failed: Operation not permitted): kernels with the internet off "
                       "run with the network here"]
    assert results[0]["status"] == 0 and not any("no network" in line for line in lines)
    assert "ran" in (tmp_path / "runs" / "stage-01" / "kernel.log").read_text()
