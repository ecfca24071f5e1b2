"""The milter driven by OpenDKIM's ``miltertest`` over a real libmilter socket: a clean message
passes with the trace header, the 21st recipient of a campaign (personalised copies, one per
message) is refused with the gate's exact 550 5.7.1 reply, a non-customer's recipients are
refused 554 5.7.1, and a stopped Redis gives the configured 451 4.3.0 until it returns."""

from __future__ import annotations

from dataclasses import dataclass

from tests.campaigns import campaign_copy
from tests.conftest import RedisServer
from tests.milter.conftest import RunLua, RunningMilter

BULK_REPLY = (
    "Refused: this message is one of 21 substantively similar messages to "
    "different recipients in 24h, and this server is not a designated list server "
    "(AUP: unsolicited bulk e-mail). See https://www.example.net/aup"
)
STORE_FAILURE = ("451", "4.3.0", "Temporary policy service failure, please try again later")


def lua(text: str | bytes) -> str:
    """A Lua string literal for ``text`` (any byte escaped as \\ddd when not plain)."""
    data = text.encode() if isinstance(text, str) else text
    escaped = (chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03d}" for b in data)
    return '"' + "".join(escaped) + '"'


PRELUDE = """
local names = {}
names[SMFIR_CONTINUE] = "continue"; names[SMFIR_ACCEPT] = "accept"
names[SMFIR_REJECT] = "reject"; names[SMFIR_TEMPFAIL] = "tempfail"
names[SMFIR_REPLYCODE] = "replycode"
local function reply(conn) return names[mt.getreply(conn)] or tostring(mt.getreply(conn)) end
local function ok(err, what) if err ~= nil then error(what .. ": " .. err) end end
"""


@dataclass
class Tx:
    mail_from: str
    rcpts: list[str]
    message: bytes
    auth: str | None = None
    expect_code: tuple[str, str, str] | None = None  # code, enhanced, text: eom_check


def session(spec: str, ip: str, txs: list[Tx]) -> str:
    """A Lua script: one connection from ``ip``, the transactions in order, echoing each reply
    as ``R <what> <reply> [<eom_check result>] [<X-Mailguard value>]``."""
    out = [PRELUDE, f"local conn = mt.connect({lua(spec)}, 40, 0.25)"]
    out.append('if conn == nil then error("connect failed") end')
    out.append(f'ok(mt.conninfo(conn, "client.test", {lua(ip)}), "conninfo")')
    out.append('ok(mt.helo(conn, "client.test"), "helo")')
    for n, tx in enumerate(txs):
        if tx.auth:
            out.append(f'ok(mt.macro(conn, SMFIC_MAIL, "{{auth_authen}}", {lua(tx.auth)}), "m")')
        out.append(f'ok(mt.mailfrom(conn, {lua("<" + tx.mail_from + ">")}), "mailfrom")')
        out.append(f'mt.echo("R mail{n} " .. reply(conn))')
        out.append("local live = false")
        for rcpt in tx.rcpts:
            out.append(f'ok(mt.rcptto(conn, {lua("<" + rcpt + ">")}), "rcptto")')
            out.append(f'mt.echo("R rcpt{n} " .. reply(conn))')
            out.append("if mt.getreply(conn) == SMFIR_CONTINUE then live = true end")
        out.append("if live then")
        head, _, body = tx.message.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            out.append(f'  ok(mt.header(conn, {lua(name)}, {lua(value)}), "header")')
        out.append('  ok(mt.eoh(conn), "eoh")')
        out.append(f'  ok(mt.bodystring(conn, {lua(body)}), "body")')
        out.append('  ok(mt.eom(conn), "eom")')
        check = '""'
        if tx.expect_code is not None:
            args = ", ".join(lua(x) for x in tx.expect_code)
            check = f"tostring(mt.eom_check(conn, MT_SMTPREPLY, {args}))"
        out.append(
            f'  mt.echo("R eom{n} " .. reply(conn) .. " " .. {check} .. " " .. '
            'tostring(mt.getheader(conn, "X-Mailguard", 0)))'
        )
        out.append("else")
        out.append('  ok(mt.abort(conn), "abort")')
        out.append("end")
    out.append("mt.disconnect(conn)")
    return "\n".join(out) + "\n"


def test_clean_message_passes_with_trace_header(milter: RunningMilter, miltertest: RunLua) -> None:
    msg = campaign_copy("user0@example.org", 0)
    lines = miltertest(
        session(milter.spec, "127.0.0.1", [Tx("news@acme.example", ["user0@example.org"], msg)])
    )
    eom = [x for x in lines if x.startswith("R eom0 ")]
    assert len(eom) == 1, lines
    _, _, action, _check, header = eom[0].split(" ", 4)
    assert action in ("accept", "continue"), lines
    decision = milter.decisions()[-1]
    assert header == f"tx={decision['tx']} campaign={decision['campaign']} decision=accept"
    assert decision["decision"] == "accept" and decision["customer"] == "acme"
    assert decision["client"] == "127.0.0.1" and decision["helo"] == "client.test"
    assert decision["mail_from"] == "news@acme.example"
    assert decision["rcpts"] == [{"rcpt": "user0@example.org", "reply": "250"}]
    assert decision["size"] == len(msg)
    policy = decision["policy"]
    assert policy["found"] == "accept" and policy["rule"] == "campaign"
    assert policy["numbers"]["distinct"] == 1 and policy["numbers"]["threshold"] == 20


def test_21st_recipient_of_a_campaign_is_refused(milter: RunningMilter, miltertest: RunLua) -> None:
    txs = [
        Tx(
            "news@acme.example",
            [f"user{i}@example.org"],
            campaign_copy(f"user{i}@example.org", i),
            expect_code=("550", "5.7.1", BULK_REPLY) if i >= 20 else None,
        )
        for i in range(22)
    ]
    lines = miltertest(session(milter.spec, "127.0.0.1", txs))
    eoms = [x.split(" ") for x in lines if x.startswith("R eom")]
    assert [e[2] for e in eoms[:20]] == ["accept"] * 20, lines
    assert eoms[20][2:4] == ["replycode", "true"], lines  # exact code, enhanced code, text
    assert eoms[21][2:4] == ["replycode", "true"], lines
    assert eoms[20][4] == "nil"  # no trace header on a refusal
    decisions = milter.decisions()
    assert len(decisions) == 22
    assert len({d["campaign"] for d in decisions}) == 1  # personalised copies: one campaign
    refused = decisions[20]
    assert refused["decision"] == "reject" and refused["rule"] == "unsolicited_bulk"
    assert refused["reply"] == "550 5.7.1 " + BULK_REPLY
    assert refused["numbers"]["count"] == 21 and refused["numbers"]["threshold"] == 20


def test_unknown_client_is_refused_relay(milter: RunningMilter, miltertest: RunLua) -> None:
    msg = campaign_copy("user0@example.org", 0)
    lines = miltertest(
        session(milter.spec, "192.0.2.1", [Tx("x@stranger.example", ["user0@example.org"], msg)])
    )
    assert "R rcpt0 replycode" in lines, lines  # setreply 554 5.7.1 + REJECT
    assert not any(x.startswith("R eom") for x in lines)
    [decision] = milter.wait_for_decisions(1)
    assert decision["customer"] is None and decision["decision"] == "aborted"
    assert decision["rcpts"] == [{"rcpt": "user0@example.org", "reply": "554"}]


def test_auth_user_identifies_the_customer(milter: RunningMilter, miltertest: RunLua) -> None:
    msg = campaign_copy("user0@example.org", 0)
    known = Tx("x@beta.example", ["user0@example.org"], msg, auth="beta-relay")
    unknown = Tx("x@beta.example", ["user0@example.org"], msg, auth="nobody")
    lines = miltertest(session(milter.spec, "192.0.2.1", [known, unknown]))
    assert "R rcpt0 continue" in lines and "R rcpt1 replycode" in lines, lines
    assert next(x for x in lines if x.startswith("R eom0 ")).split(" ")[2] == "accept", lines
    first, second = milter.wait_for_decisions(2)
    assert (first["customer"], first["auth"], first["decision"]) == ("beta", "beta-relay", "accept")
    # An {auth_authen} that names no configured user falls back to the client address.
    assert (second["customer"], second["auth"], second["decision"]) == (None, "nobody", "aborted")


def test_redis_stopped_gives_tempfail_then_recovers(
    milter: RunningMilter, miltertest: RunLua, redis_server: RedisServer
) -> None:
    msg = campaign_copy("user0@example.org", 0)
    tx = Tx("news@acme.example", ["user0@example.org"], msg, expect_code=STORE_FAILURE)
    redis_server.stop()
    try:
        lines = miltertest(session(milter.spec, "127.0.0.1", [tx]))
    finally:
        redis_server.start()
    eom = next(x.split(" ") for x in lines if x.startswith("R eom0 "))
    assert eom[2:4] == ["replycode", "true"], lines  # 451 4.3.0 + TEMPFAIL
    decision = milter.decisions()[-1]
    assert decision["decision"] == "defer" and decision["rule"] == "store_failure"
    assert decision["reply"].startswith("451 4.3.0 ")
    # Redis is back: the same milter process accepts again, without a restart.
    lines = miltertest(
        session(milter.spec, "127.0.0.1", [Tx("news@acme.example", ["user0@example.org"], msg)])
    )
    assert next(x for x in lines if x.startswith("R eom0 ")).split(" ")[2] == "accept", lines
    assert milter.decisions()[-1]["decision"] == "accept"


def test_frozen_redis_gives_tempfail_within_the_store_timeout(
    milter: RunningMilter, miltertest: RunLua, redis_server: RedisServer
) -> None:
    msg = campaign_copy("user0@example.org", 0)
    tx = Tx("news@acme.example", ["user0@example.org"], msg, expect_code=STORE_FAILURE)
    redis_server.pause()  # connections accepted, nothing answered
    try:
        lines = miltertest(session(milter.spec, "127.0.0.1", [tx]))
    finally:
        redis_server.resume()
    eom = next(x.split(" ") for x in lines if x.startswith("R eom0 "))
    assert eom[2:4] == ["replycode", "true"], lines
    decision = milter.decisions()[-1]
    assert decision["rule"] == "store_failure"
    assert decision["ms"]["policy"] < 4000  # store timeout 1s, milter --timeout 5s
