"""Webhook signing, the retry schedule and the target checks (SSRF), without a server."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from tuneq.errors import InvalidRequest
from tuneq.settings import Settings
from tuneq.webhooks.delivery import retry_wait
from tuneq.webhooks.signing import new_secret, signature
from tuneq.webhooks.targets import check_target, host_matches, non_public_kind


def test_signature_matches_the_standard_webhooks_test_vector():
    # standard-webhooks/standard-webhooks, libraries/python/tests/test_webhooks.py,
    # test_sign_function: the reference library's own expected value.
    assert (
        signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            '{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_secrets_are_whsec_and_enough_random_bytes():
    secrets = {new_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24


def test_retries_wait_the_schedule_with_jitter_then_stop():
    schedule = (5, 300, 1800)
    assert retry_wait(schedule, 1, rand=lambda: 0.5) == 5
    assert retry_wait(schedule, 2, rand=lambda: 0.0) == pytest.approx(240)
    assert retry_wait(schedule, 3, rand=lambda: 1.0) == pytest.approx(2160)
    assert retry_wait(schedule, 4) is None  # 1 + 3 attempts, then failed for good
    assert retry_wait((), 1) is None


def test_the_default_schedule_retries_for_about_a_day():
    schedule = Settings().webhook_retry_schedule_seconds
    assert schedule[0] == 5 and len(schedule) == 7
    assert 20 * 3600 < sum(schedule) < 30 * 3600


def test_the_schedule_and_the_allowlist_read_comma_separated_variables(monkeypatch):
    monkeypatch.setenv("TUNEQ_WEBHOOK_RETRY_SCHEDULE_SECONDS", "1, 1,2.5")
    monkeypatch.setenv("TUNEQ_WEBHOOK_ALLOWED_HOSTS", "hooks.example.com,*.corp.example")
    settings = Settings()
    assert settings.webhook_retry_schedule_seconds == (1.0, 1.0, 2.5)
    assert settings.webhook_allowed_hosts == ("hooks.example.com", "*.corp.example")


@pytest.mark.parametrize(
    ("host", "pattern", "matches"),
    [
        ("hooks.example.com", "hooks.example.com", True),
        ("hooks.example.com", "HOOKS.example.com.", True),
        ("a.hooks.example.com", "hooks.example.com", False),
        ("a.example.com", "*.example.com", True),
        ("a.b.example.com", "*.example.com", True),
        ("example.com", "*.example.com", False),
        ("badexample.com", "*.example.com", False),
    ],
)
def test_allowlist_patterns(host, pattern, matches):
    assert host_matches(host, pattern) is matches


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_non_public_addresses_are_named(address, kind):
    assert non_public_kind(ipaddress.ip_address(address)) == kind


def _refusal(url, **settings):
    with pytest.raises(InvalidRequest) as refused:
        check_target(url, Settings(**settings))
    assert refused.value.param == "url"
    assert refused.value.errors[0].field == "url"
    return refused.value.errors[0].message


def test_targets_are_refused_with_the_reason():
    assert "http or https" in _refusal("ftp://8.8.8.8/hook")
    assert "credentials" in _refusal("https://user:pw@8.8.8.8/hook")
    assert "no host" in _refusal("https:///hook")
    assert "port" in _refusal("https://8.8.8.8:99999/hook")
    assert "loopback" in _refusal("http://localhost:8080/hook")
    assert "loopback" in _refusal("http://[::ffff:127.0.0.1]/hook")
    assert "link-local" in _refusal("http://169.254.169.254/latest/meta-data")
    assert "not in" in _refusal("https://8.8.8.8/hook", webhook_allowed_hosts=("1.1.1.1",))
    # an allowlisted private host still needs the operator's permission for private targets
    assert "loopback" in _refusal("http://localhost/hook", webhook_allowed_hosts=("localhost",))


def test_targets_that_pass():
    assert check_target("https://8.8.8.8/hook", Settings()).address == ipaddress.ip_address(
        "8.8.8.8"
    )
    allowlisted = Settings(webhook_allowed_hosts=("1.1.1.1", "*.example.com"))
    assert check_target("https://1.1.1.1:8443/h", allowlisted).host == "1.1.1.1"
    private = Settings(webhook_allow_private=True, webhook_allowed_hosts=("localhost",))
    target = check_target("http://LOCALHOST:9/hook", private)
    assert target.host == "localhost" and target.address.is_loopback
