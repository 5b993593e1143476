"""The playground: the hybrid loop live in a browser (`tandem playground`).

    events.py   one generation as a stream of events: text pieces by origin, verify rounds,
                going offline and rejoining, running usage, auto's decision
    server.py   the FastAPI app: the page, the events as server-sent events, the link controls
    static/     the page (HTML, CSS, vanilla JS; nothing is loaded from the internet)

The page's DOM hooks are stable, for tests and for people who script it: `#prompt`, `#mode`,
`#generate`, `#output` (token spans with the classes `tok-accepted`, `tok-cloud`, `tok-local`),
`#usage`, `#cut-link`, `#restore-link`.
"""

from .events import Event, generation_events, summarize
from .server import Defaults, GenerateForm, LinkForm, Playground, create_app

__all__ = [
    "Event",
    "generation_events",
    "summarize",
    "Playground",
    "GenerateForm",
    "LinkForm",
    "Defaults",
    "create_app",
]
