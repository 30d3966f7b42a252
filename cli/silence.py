"""``icd-silence``: silence health alerts and take incidents, from a terminal.

    icd-silence add --service S [--node N] [--check C] (--for 1h | --until ISO | --until-recovered)
                    [--start ISO] --by NAME --why TEXT
    icd-silence list [--json] [--all]           # active and pending (--all: ended ones still kept, too)
    icd-silence expire ID --by NAME
    icd-silence ack NODE/SERVICE_ID --by NAME [--why TEXT]

Matchers are exact names or globs (``web-*``). A silenced transition is still an ``icd.health.*`` event
(labelled ``icd.silenced=<id>``) but is not sent and pages no one; ``ack`` stops the reminders of one
instance's incident and shows who took it. The book lives in Consul KV (``icd/silences``), beside the
watch's state; ``--consul-block`` (default ``consul``) or ``--consul-addr`` (token from ``CONSUL_HTTP_TOKEN``)
says where. Each change is announced through the notifier block and shown in the UI (the ``icd-silences``
table artifact), unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import consul

from icd.errors import DeployError, InvalidInputError
from icd.health.consul import parse_consul_address
from icd.health.silence_store import SilenceStore
from icd.health.silences import (
    SilenceBook,
    acknowledge,
    acknowledged_notification,
    added_notification,
    ended_notification,
    expire,
    in_incident,
    new_silence,
    table_rows,
)
from icd.health.state import HealthStateStore
from icd.notify.message import Notification

T = TypeVar("T")
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_ACK_REFUSALS = {
    "unknown instance": "the watch knows no instance {instance} (NODE/SERVICE_ID, as alerts name it)",
    "not in an incident": "{instance} is passing: there is no incident to take",
    "taken by another": "{instance} is already taken by {holder}",
}


def parse_duration(text: str) -> timedelta:
    """``90m``, ``1h``, ``1h30m``, ``2d``: whole numbers with s/m/h/d."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidInputError(f"invalid duration {text!r}: like 30m, 1h, 4h, 1h30m or 2d")
    span = sum((timedelta(**{_UNITS[unit]: int(number)}) for number, unit in parts), timedelta())
    if span <= timedelta(0):
        raise InvalidInputError(f"invalid duration {text!r}: it must be longer than nothing")
    return span


def parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInputError(f"invalid time {text!r}: ISO 8601 with a zone, like 2026-12-05T14:00:00Z") from exc
    if moment.tzinfo is None:
        raise InvalidInputError(f"invalid time {text!r}: give a zone (Z or +01:00), so nobody guesses it")
    return moment


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type: its message, not argparse's generic one, when it refuses."""

    def checked(text: str) -> T:
        try:
            return parse(text)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return checked


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd-silence", description="Silence health alerts and take incidents.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--consul-block", default="consul", help="a saved Consul Connection block (%(default)s)")
    where.add_argument("--consul-addr", help="the agent's HTTP API instead of a block: http(s)://host:port")
    parser.add_argument("--notifier-block", default="ops-slack", help="where changes are announced (%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="announce nothing and leave the UI table as it is")
    parser.add_argument(
        "--watch",
        default="default",
        help="the health watch (its watch_name) whose state 'ack' and '--until-recovered' read; it ends them",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    add = commands.add_parser("add", help="silence matching alerts for a while")
    add.add_argument("--service", required=True, help="service name or glob")
    add.add_argument("--node", default="*", help="node name or glob (default: any)")
    add.add_argument("--check", default="*", help="check name, check ID or glob (default: any)")
    span = add.add_mutually_exclusive_group(required=True)
    span.add_argument("--for", dest="duration", type=_argument(parse_duration), help="how long: 30m, 1h, 4h, 2d")
    span.add_argument("--until", type=_argument(parse_time), help="when it ends: ISO 8601 with a zone")
    span.add_argument("--until-recovered", action="store_true", help="until every matched instance passes again")
    add.add_argument(
        "--start", type=_argument(parse_time), help="when it starts (default: now); not with --until-recovered"
    )

    listing = commands.add_parser("list", help="active and pending silences")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.add_argument("--all", action="store_true", help="also the ended silences still kept")

    ended = commands.add_parser("expire", help="end a silence now")
    ended.add_argument("id")

    ack = commands.add_parser("ack", help="take an instance's incident: no more reminders, your name on its alerts")
    ack.add_argument("instance", help="NODE/SERVICE_ID, as its alert names it")
    ack.add_argument("--why", default="", help="a note shown with it")

    for command in (add, ended, ack):
        command.add_argument("--by", required=True, help="who you are; recorded and shown")
    add.add_argument("--why", required=True, help="why; recorded and shown")
    return parser


def consul_client(args: argparse.Namespace) -> consul.Consul:
    if args.consul_addr:
        endpoint = parse_consul_address(args.consul_addr)
        return consul.Consul(host=endpoint.host, port=endpoint.port, scheme=endpoint.scheme)
    from blocks.consul import ConsulConnection  # Prefect is imported only when a block is used

    block = ConsulConnection.load(args.consul_block)
    if not isinstance(block, ConsulConnection):
        raise InvalidInputError(f"block {args.consul_block!r} is not a Consul Connection block")
    return block.get_client()


def tell(args: argparse.Namespace, notification: Notification, book: SilenceBook | None) -> None:
    """Announce a change and refresh the UI's table; best effort: the change is made either way."""
    if args.quiet:
        return
    try:
        from blocks.notifier import load_notifier  # the one place this command sends a message

        load_notifier(args.notifier_block).sender().send(notification)
    except Exception as exc:  # noqa: BLE001  # a lost announcement must not undo or hide the change
        print(f"icd-silence: done, but not announced through {args.notifier_block!r}: {exc}", file=sys.stderr)
    if book is not None:
        try:
            from tasks.silences import publish_silences

            publish_silences(book)
        except Exception as exc:  # noqa: BLE001  # the table is a view; the book in Consul is the record
            print(f"icd-silence: done, but the UI table was not updated: {exc}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    store = SilenceStore(consul_client(args))
    now = datetime.now(UTC)
    if args.command == "list":
        book = store.load().book
        shown = book.silences if args.all else tuple(book.current(now))
        if args.json:
            print(json.dumps([s.model_dump(mode="json") | {"state": s.state(now)} for s in shown], indent=2))
        else:
            for row in table_rows(shown, now):
                print("\t".join(row.values()))
            if not shown:
                print("no silence is active or pending", file=sys.stderr)
        return 0
    if args.command == "add":
        starts = args.start or now
        ends = None if args.until_recovered else args.until or starts + args.duration
        silence = new_silence(
            service=args.service,
            node=args.node,
            check=args.check,
            starts_at=starts,
            ends_at=ends,
            by=args.by,
            why=args.why,
            now=now,
            watch=args.watch,
        )
        if silence.until_recovered:
            records = HealthStateStore(store.client, args.watch).load().state.instances.values()
            if not any(silence.covers_instance(r.service_name, r.node) and in_incident(r) for r in records):
                raise InvalidInputError(
                    f"nothing matching {silence.matchers()} is failing now: a silence until recovery would end at "
                    "once; use --for or --until"
                )
        book, _ = store.change(lambda current: (current.with_silence(silence, now), None))
        print(f"{silence.id}\t{silence.state(now)}\t{silence.matchers()}\t{silence.span()}")
        tell(args, added_notification(silence, now), book)
        return 0
    if args.command == "expire":
        book, outcome = store.change(lambda current: expire(current, args.id, by=args.by, now=now))
        if outcome != "expired":
            print(f"icd-silence: silence {args.id!r}: {outcome}", file=sys.stderr)
            return 0 if outcome == "already ended" else 1
        ended = book.find(args.id)
        assert ended is not None  # just expired in this very book
        print(f"{ended.id}\texpired by {ended.ended_by}")
        tell(args, ended_notification(ended, "expired"), book)
        return 0
    # ack
    state = HealthStateStore(store.client, args.watch).load().state
    book, taken = store.change(
        lambda current: acknowledge(
            current, state.instances, args.instance, by=args.by, why=args.why, now=now, watch=args.watch
        )
    )
    if taken in _ACK_REFUSALS:
        holder = book.acknowledged_by(args.instance)
        print(f"icd-silence: {_ACK_REFUSALS[taken].format(instance=args.instance, holder=holder)}", file=sys.stderr)
        return 1
    ack = book.acknowledgements[args.instance]
    print(f"{ack.instance}\ttaken by {ack.by}")
    if taken == "taken":
        tell(args, acknowledged_notification(ack), None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DeployError as exc:
        print(f"icd-silence: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
