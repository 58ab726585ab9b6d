"""`llava-serve web`: the Gradio chat page, an HTTP client of the controller and nothing more."""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path

import gradio as gr

from contract.client import ControllerClient
from contract.feedback_messages import FeedbackType
from frontend.conversation import Conversation, ImageMode, display_dir, mode_choices
from frontend.feedback import FeedbackHandlers
from frontend.handlers import ChatHandlers
from frontend.users import page_login
from infra.settings import WebSettings

log = logging.getLogger("llava.web")

USER_AGENT = "llava-serve-web"  # how the controller's logs tell the UI from other clients
EXAMPLES_DIR = Path(__file__).parent / "examples"
# Drawn by the demo model's own drawing code (frontend/examples/make_examples.py), each with a question.
EXAMPLES = [(e["file"], e["question"]) for e in json.loads((EXAMPLES_DIR / "examples.json").read_text())]

TITLE = """# 🌋 LLaVA: Large Language and Vision Assistant
Served by **llava-serve**. Upload one or more images, ask about them, and keep chatting."""

LOGIN_MESSAGE = "Log in with your name and your API key as the password."

MODEL_LIST_REFRESH_S = 10.0
EMPTY_TEXTBOX_JS = "() => ({text: '', files: []})"
PRIVATE_MULTIPLE = {"api_visibility": "private", "trigger_mode": "multiple"}

# Layout only (Gradio's components and theme stay): the chat fills what the screen leaves, so the text box, Send,
# Stop and the votes are on the first screen of a laptop (1366 x 768) and a phone (390 x 844), where the chat
# column also comes before the settings.
CSS = """
#buttons button { min-width: min(120px, 100%); }
#status { padding: 0 0.5em; }
#chatbot .message:has(.no-vote) button[aria-label^="Like"],
#chatbot .message:has(.no-vote) button[aria-label^="Dislike"] { display: none !important; }
#chatbot { height: max(240px, calc(100vh - 330px)) !important; }
#chatbot .placeholder-content, #chatbot .placeholder { padding-top: 2.2em; }  /* clear of the chat's label */
@media (max-width: 768px) {
  #chat-column { order: -1; }
  #title p { display: none; }
  #title h1 { font-size: 1.25rem; margin: 0; }
  #chatbot { height: max(200px, calc(100vh - 420px)) !important; }
  #input-row { flex-wrap: wrap; }
  #input-row > .form { flex: 1 1 100% !important; min-width: 100% !important; }  /* the text box's wrapper */
  #input-row #send, #input-row #stop { flex: 1 1 40% !important; min-width: 0 !important; }
  #buttons button { min-width: 0; flex: 1 1 18%; padding-left: 2px; padding-right: 2px; }
}
"""


def build_demo(
    settings: WebSettings, client: ControllerClient | None = None, *, model_list_refresh_s: float = MODEL_LIST_REFRESH_S
) -> gr.Blocks:
    """The page, wired to a controller client; call `.queue()` and `.launch()` on it (as `run_web` does). Each open
    page asks for the model list every `model_list_refresh_s`, so it recovers from a late worker or controller."""
    client = client or ControllerClient(settings.controller_url, api_key=settings.api_key, user_agent=USER_AGENT)
    handlers = ChatHandlers(settings, client)
    votes = FeedbackHandlers(client)
    # The controller may be down: the page then says so and each page load retries.
    initial = [m.name for m in handlers.fetch_models()[0]]

    with gr.Blocks(title="LLaVA", analytics_enabled=False) as demo:
        state = gr.State(Conversation())
        if not settings.embed:
            gr.Markdown(TITLE, elem_id="title")
        status = gr.Markdown("", visible=False, elem_id="status")
        with gr.Row(elem_id="main-row"):
            with gr.Column(scale=3, elem_id="settings-column"):
                model = gr.Dropdown(
                    choices=initial,
                    value=initial[0] if initial else None,
                    label="Model",
                    interactive=True,
                    allow_custom_value=True,  # API clients name models too; the controller validates them
                    elem_id="model",
                )
                mode = gr.Radio(
                    mode_choices(list(ImageMode)),
                    value=ImageMode.default.value,
                    label="Pre-process non-square images",
                    info="Crop: center square · Resize: stretch to square · Pad: square with grey · Default: as is",
                    elem_id="image-mode",
                )
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature")
                    top_p = gr.Slider(0.0, 1.0, value=0.7, step=0.1, label="Top P")
                    max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max output tokens")
            with gr.Column(scale=8, elem_id="chat-column"):
                chatbot = gr.Chatbot(
                    label="LLaVA Chatbot",
                    elem_id="chatbot",
                    height=560,
                    layout="panel",
                    render_markdown=True,
                    feedback_options=("Like", "Dislike"),  # 👍 / 👎 on every reply: `vote_on_reply`
                    placeholder="Upload images and ask a question about them.",
                )
                with gr.Row(elem_id="input-row"):
                    textbox = gr.MultimodalTextbox(
                        placeholder="Enter text (attach images with the clip) and press ENTER",
                        show_label=False,
                        file_types=["image"],
                        file_count="multiple",
                        sources=["upload"],
                        submit_btn=False,
                        scale=8,
                        elem_id="textbox",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("⏹️ Stop", scale=1, interactive=False, elem_id="stop")
                with gr.Row(elem_id="buttons"):
                    upvote = gr.Button("👍 Upvote", interactive=False, elem_id="upvote")
                    downvote = gr.Button("👎 Downvote", interactive=False, elem_id="downvote")
                    flag = gr.Button("⚠️ Flag", interactive=False, elem_id="flag")
                    regenerate = gr.Button("🔄 Regenerate", interactive=False, elem_id="regenerate")
                    clear = gr.Button("🗑️ Clear", interactive=False, elem_id="clear")
                reason = gr.Textbox(
                    label="Reason for flagging (optional)", max_lines=3, max_length=2000, elem_id="flag-reason"
                )
                gr.Examples(
                    examples=[[{"text": q, "files": [str(EXAMPLES_DIR / f)]}] for f, q in EXAMPLES],
                    inputs=[textbox],
                    label="Examples",
                )
        if not settings.embed:
            terms = gr.Markdown(handlers.terms(), elem_id="terms")
            demo.load(handlers.terms, None, [terms], queue=False, api_visibility="private")

        buttons = [upvote, downvote, flag, regenerate, clear, stop]
        stream = dict(
            fn=handlers.generate,
            inputs=[state, model, temperature, top_p, max_tokens],
            outputs=[state, chatbot, *buttons],
            concurrency_limit=settings.concurrency_limit,
            concurrency_id="generate",  # one limit across Send, Enter and Regenerate
            show_progress="hidden",
        )
        add = dict(fn=handlers.add_message, inputs=[state, textbox, mode], outputs=[state, chatbot, textbox, *buttons])
        # "multiple": a second Send while the first is handled is taken too (Gradio drops it by default).
        textbox.submit(**add, api_name="add_message", trigger_mode="multiple").then(**stream, api_name="generate")
        send.click(**add, api_visibility="private", trigger_mode="multiple").then(**stream, api_visibility="private")
        # Registered after `add`, which has read the textbox by then: the browser empties it at once, so text typed
        # before the server answers is not wiped by a late reply (`add_message` puts a refused message back).
        for sent in (textbox.submit, send.click):
            sent(
                None,
                None,
                [textbox],
                js=EMPTY_TEXTBOX_JS,
                queue=False,
                api_visibility="private",
                trigger_mode="multiple",
            )
        regenerate.click(handlers.regenerate, [state], [state, chatbot, *buttons], api_name="regenerate").then(
            **stream, api_visibility="private"
        )
        stop.click(handlers.stop, None, None, queue=False, api_name="stop")
        cleared = [state, chatbot, textbox, status, *buttons]
        clear.click(handlers.clear, [state], cleared, queue=False, api_name="clear")
        # The chat panel's own trash icon empties the panel in the browser; the conversation must go with it.
        chatbot.clear(handlers.clear, [state], cleared, queue=False, api_visibility="private")
        for button, kind in (
            (upvote, FeedbackType.upvote),
            (downvote, FeedbackType.downvote),
            (flag, FeedbackType.flag),
        ):
            button.click(
                partial(votes.feedback, kind),
                [state, reason],
                [status, upvote, downvote, flag, reason, chatbot],
                api_name=kind.value,
            )
        # The browser sends the message's index and text in gr.LikeData, which API clients cannot: UI only.
        chatbot.like(votes.on_like, [state], [status, chatbot, upvote, downvote], api_visibility="private")
        demo.load(handlers.load, None, [state, model, status], queue=False).then(
            handlers.image_modes, [model, mode], [mode], queue=False
        )
        model.change(handlers.image_modes, [model, mode], [mode], queue=False, api_visibility="private")
        refresh = gr.Timer(model_list_refresh_s)
        refresh.tick(
            handlers.refresh_models, [model, status], [model, status], queue=False, show_progress="hidden"
        ).then(handlers.image_modes, [model, mode], [mode], queue=False, show_progress="hidden")
    return demo


def launch(demo: gr.Blocks, settings: WebSettings, *, block: bool = True) -> None:
    """Queue and launch `demo` as `settings` say (theme and CSS are launch options in Gradio 6), behind a login
    when `--auth` or `--auth-keys-file` is set."""
    login = page_login(settings.auth, settings.auth_keys_file)
    demo.queue(max_size=settings.max_queue, default_concurrency_limit=settings.concurrency_limit)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        theme=gr.themes.Default(),
        css=CSS,
        allowed_paths=[str(EXAMPLES_DIR), str(display_dir())],
        footer_links=["api"] if not settings.embed else [],
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
        auth=login,
        auth_message=LOGIN_MESSAGE if login is not None and login.keys is not None else None,
    )


def run_web(settings: WebSettings) -> int:
    """Serve the UI until interrupted; starts even when the controller is down."""
    client = ControllerClient(settings.controller_url, api_key=settings.api_key, user_agent=USER_AGENT)
    demo = build_demo(settings, client)
    log.info("web UI on http://%s:%d, controller %s", settings.host, settings.port, settings.controller_url)
    try:
        launch(demo, settings)
    finally:
        client.close()
    return 0


def add_web_arguments(parser: argparse.ArgumentParser) -> None:
    d = WebSettings.model_fields
    parser.add_argument(
        "--controller-url", default=None, help=f"controller base URL (default {d['controller_url'].default})"
    )
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default 7860)")
    parser.add_argument(
        "--concurrency-limit", type=int, default=None, help="replies streamed at once by this process (default 16)"
    )
    parser.add_argument("--max-queue", type=int, default=None, help="requests waiting in the UI's queue (default 64)")
    parser.add_argument("--share", action="store_true", default=None, help="open a public Gradio share link")
    parser.add_argument("--embed", action="store_true", default=None, help="hide the title and the terms of use")
    parser.add_argument(
        "--model-list-mode",
        choices=["once", "reload"],
        default=None,
        help="fetch the model list once, or on every page load (default reload)",
    )
    parser.add_argument("--image-max-side", type=int, default=None, help="cap on an image's long side (default 1344)")
    parser.add_argument("--api-key", default=None, help="bearer token for the controller, if it requires one")
    parser.add_argument(
        "--auth",
        action="append",
        default=None,
        metavar="USER:PASSWORD",
        help="require a login to use the page (repeatable); limits then count by login name",
    )
    parser.add_argument(
        "--auth-keys-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="let holders of an API key in FILE (the controller's keys file) log in, with any name and the key as "
        "the password",
    )


def web_settings_from_args(args: argparse.Namespace) -> WebSettings:
    """Flags given on the command line override `LLAVA_WEB_*` variables, which override defaults."""
    names = (
        "controller_url",
        "host",
        "port",
        "concurrency_limit",
        "max_queue",
        "share",
        "embed",
        "model_list_mode",
        "image_max_side",
        "api_key",
        "auth",
        "auth_keys_file",
    )
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return WebSettings(**given)
