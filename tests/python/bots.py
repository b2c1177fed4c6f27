"""Real bot frameworks against a Parvis test server (run by tests/integration/python_bots.rs).

1. An application service built on mautrix-python (the framework of the mautrix bridges)
   listens on the given port, registers its user @mautrix_echo through
   m.login.application_service, joins the room as that user (as_token + user_id masquerading)
   and answers every message it receives in a transaction with "echo: <body>".
2. A plain bot on matrix-nio logs in with a password, joins the room, posts "ping from nio"
   and syncs until it sees the appservice's echo.

Arguments: homeserver URL, appservice port, as_token, hs_token, room ID, nio user localpart.
The nio user's password is in PARVIS_PASSWORD. Prints PASSED on success; exits non-zero with
the reason otherwise.
"""

import asyncio
import logging
import os
import sys
import time

from mautrix.appservice import AppService
from mautrix.types import EventType, MessageEvent, TextMessageEventContent, MessageType
from nio import AsyncClient, LoginResponse, JoinResponse, RoomSendResponse, SyncResponse, RoomMessageText


async def main() -> int:
    hs, port, as_token, hs_token, room_id, nio_user = sys.argv[1:7]
    password = os.environ["PARVIS_PASSWORD"]
    logging.basicConfig(level=logging.WARNING)

    appservice = AppService(
        server=hs,
        domain="localhost",
        as_token=as_token,
        hs_token=hs_token,
        bot_localpart="mautrixbot",
        id="mautrixtest",
    )
    echo_user = "@mautrix_echo:localhost"
    received: list[str] = []

    async def on_event(evt) -> None:
        if evt.type != EventType.ROOM_MESSAGE or evt.sender == echo_user:
            return
        body = evt.content.body
        received.append(body)
        intent = appservice.intent.user(echo_user)
        await intent.send_message(evt.room_id, TextMessageEventContent(msgtype=MessageType.TEXT, body=f"echo: {body}"))

    appservice.matrix_event_handler(on_event)
    await appservice.start(host="127.0.0.1", port=int(port))
    try:
        intent = appservice.intent.user(echo_user)
        await intent.ensure_registered()
        await intent.ensure_joined(room_id)
        whoami = await intent.whoami()
        assert whoami.user_id == echo_user, whoami
        ping = await appservice.intent.api.request(
            "POST", f"/_matrix/client/v1/appservice/mautrixtest/ping", {"transaction_id": "mautrix-ping"}
        )
        assert "duration_ms" in ping, ping
        print("appservice ready: registered, joined, pinged", flush=True)

        client = AsyncClient(hs, f"@{nio_user}:localhost")
        login = await client.login(password, device_name="nio bot")
        assert isinstance(login, LoginResponse), login
        joined = await client.join(room_id)
        assert isinstance(joined, JoinResponse), joined
        first = await client.sync(timeout=0)
        assert isinstance(first, SyncResponse), first
        sent = await client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": "ping from nio"}
        )
        assert isinstance(sent, RoomSendResponse), sent
        print("nio bot: logged in, joined, posted", flush=True)

        deadline = time.monotonic() + 60
        seen_echo = False
        while time.monotonic() < deadline and not seen_echo:
            resp = await client.sync(timeout=5000)
            assert isinstance(resp, SyncResponse), resp
            room = resp.rooms.join.get(room_id)
            if room:
                for ev in room.timeline.events:
                    if isinstance(ev, RoomMessageText) and ev.sender == echo_user and ev.body == "echo: ping from nio":
                        seen_echo = True
        await client.close()
        if not seen_echo:
            print(f"FAILED: no echo seen; the appservice received {received}", flush=True)
            return 1
        assert "ping from nio" in received, received
        print("PASSED", flush=True)
        return 0
    finally:
        await appservice.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
