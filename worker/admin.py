"""Admin CLI for the data a host application would otherwise write; prints JSON.

    python -m worker.admin create-user --username "Ivan Petrov" [--avatar PATH] [--user-id ID]
    python -m worker.admin issue-token --user-id ID [--ttl SECONDS]
    python -m worker.admin revoke-token --token TOKEN
    python -m worker.admin create-chat [--chat-id ID] [--title T] --member ID [--member ID ...]
    python -m worker.admin add-member --chat-id ID --user-id ID
    python -m worker.admin remove-member --chat-id ID --user-id ID

Only a token's SHA-256 digest is stored; the token itself is printed once.

``remove-member`` and ``revoke-token`` also announce the change to every gateway (Redis
pub/sub), which stops the pushes of sockets already authorised with it at once rather
than at their next request; ``add-member`` announces too, so a member added back is
served and pushed to at once. If Redis cannot be reached the change stands, the output
says ``"announced": false`` and the exit status is 1: run the command again.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import sys
from typing import Any

import orjson
from pymongo.errors import DuplicateKeyError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.codec import Admission, ControlMessage, Revocation, encode_control, token_digest
from shared.config import Settings
from shared.keys import Keys
from shared.mongo import create_client
from shared.protocol import check_media_url, normalise_id, normalise_url_prefixes

from .store import Store


class AdminError(Exception):
    """A request the CLI refuses, with a message for the operator."""


def _id(value: str) -> str:
    normalised = normalise_id(value)
    if normalised is None:
        raise argparse.ArgumentTypeError("ids are 1 to 64 printable characters")
    return normalised


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.admin", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create-user", help="create a user and a first token")
    p.add_argument("--username", required=True)
    p.add_argument("--avatar", help="URL path of the avatar image")
    p.add_argument("--user-id", type=_id)
    p.add_argument("--ttl", type=float, help="token lifetime in seconds (default: no expiry)")
    p = sub.add_parser("issue-token", help="issue another token for a user")
    p.add_argument("--user-id", type=_id, required=True)
    p.add_argument("--ttl", type=float, help="token lifetime in seconds (default: no expiry)")
    p = sub.add_parser("revoke-token", help="revoke a token")
    p.add_argument("--token", required=True)
    p = sub.add_parser("create-chat", help="create a chat with its members")
    p.add_argument("--chat-id", type=_id)
    p.add_argument("--title")
    p.add_argument("--member", type=_id, action="append", required=True)
    for name in ("add-member", "remove-member"):
        p = sub.add_parser(name, help=f"{name.split('-')[0]} a chat member")
        p.add_argument("--chat-id", type=_id, required=True)
        p.add_argument("--user-id", type=_id, required=True)
    return parser


async def _issue(store: Store, user_id: str, ttl: float | None) -> dict[str, Any]:
    token = secrets.token_hex(16)
    doc: dict[str, Any] = {"_id": token_digest(token), "user_id": user_id}
    if ttl is not None:
        doc["expires_at"] = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl)
    await store.tokens.insert_one(doc)
    return {"user_id": user_id, "token": token}


def check_avatar(avatar: str, settings: Settings) -> None:
    """Refuse an avatar URL a browser should not load (same policy as ``file_url``)."""
    try:
        prefixes = normalise_url_prefixes(settings.file_url_prefixes)
    except ValueError as exc:
        raise AdminError(f"FILE_URL_PREFIXES: {exc}") from None
    problem = check_media_url(avatar, prefixes)
    if problem is not None:
        raise AdminError(f"avatar {problem}")


async def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Carry out one command; returns what is printed."""
    if getattr(args, "avatar", None) is not None:
        check_avatar(args.avatar, settings)
    client = create_client(settings.mongo_url, appname="chat-admin")
    try:
        store = Store(client[settings.mongo_database])
        await store.ensure_indexes()
        result = await _dispatch(store, args)
    finally:
        await client.close()
    control = _control_message(args)
    if control is not None:
        # Also when nothing changed: a second run announces what a first one could not.
        result["announced"] = await announce(settings, control)
    return result


def _control_message(args: argparse.Namespace) -> ControlMessage | None:
    if args.command == "remove-member":
        return Revocation(chat_id=args.chat_id, user_ids=(args.user_id,))
    if args.command == "add-member":
        return Admission(chat_id=args.chat_id, user_ids=(args.user_id,))
    if args.command == "revoke-token":
        return Revocation(token_digests=(token_digest(args.token),))
    return None


async def announce(settings: Settings, message: ControlMessage) -> bool:
    """Publish ``message`` to every gateway and worker; False when Redis could not be
    reached."""
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        await redis.publish(Keys(settings.redis_prefix).control_channel, encode_control(message))
        return True
    except (RedisError, OSError):
        return False
    finally:
        await redis.aclose()


async def _dispatch(store: Store, args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "create-user":
        user_id = args.user_id or await store.next_id("users")
        try:
            await store.users.insert_one(
                {"_id": user_id, "username": args.username, "avatar": args.avatar}
            )
        except DuplicateKeyError:
            raise AdminError(f"user {user_id} exists already") from None
        return await _issue(store, user_id, args.ttl)
    if args.command == "issue-token":
        if await store.users.find_one({"_id": args.user_id}) is None:
            raise AdminError(f"no user {args.user_id}")
        return await _issue(store, args.user_id, args.ttl)
    if args.command == "revoke-token":
        result = await store.tokens.delete_one({"_id": token_digest(args.token)})
        return {"revoked": result.deleted_count == 1}
    if args.command == "create-chat":
        members = list(dict.fromkeys(args.member))
        known = await store.users_by_id(members)
        unknown = [m for m in members if m not in known]
        if unknown:
            raise AdminError(f"no such users: {', '.join(unknown)}")
        chat_id = args.chat_id or await store.next_id("chats")
        try:
            await store.chats.insert_one(
                {"_id": chat_id, "title": args.title, "member_ids": members}
            )
        except DuplicateKeyError:
            raise AdminError(f"chat {chat_id} exists already") from None
        return {"chat_id": chat_id}
    if args.command in ("add-member", "remove-member"):
        if (
            args.command == "add-member"
            and await store.users.find_one({"_id": args.user_id}) is None
        ):
            raise AdminError(f"no user {args.user_id}")
        op = "$addToSet" if args.command == "add-member" else "$pull"
        updated = await store.chats.update_one(
            {"_id": args.chat_id}, {op: {"member_ids": args.user_id}}
        )
        if updated.matched_count == 0:
            raise AdminError(f"no chat {args.chat_id}")
        return {
            "chat_id": args.chat_id,
            "user_id": args.user_id,
            "changed": updated.modified_count == 1,
        }
    raise AdminError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 1 with a JSON error on refusal."""
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    try:
        result = asyncio.run(run(args, settings))
    except AdminError as exc:
        sys.stdout.write(orjson.dumps({"error": str(exc)}).decode() + "\n")
        return 1
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 1 if result.get("announced") is False else 0


if __name__ == "__main__":
    sys.exit(main())
