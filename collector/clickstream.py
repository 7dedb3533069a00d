"""The documented import path of the clickstream pack: ``from collector.clickstream import ClickEvent``."""

from .packs.clickstream import (
    EVENT_TYPES,
    ClickBase,
    ClickEvent,
    ClickstreamOptions,
    ElementClick,
    PageView,
    PageViewEnd,
    PageViewStart,
    QualityChange,
    SearchFilter,
    VideoComplete,
    click_event_type,
    clickstream_pipeline,
    register,
)
from .packs.clickstream_gen import SessionStream, generate_sessions

__all__ = [
    "EVENT_TYPES", "ClickBase", "ClickEvent", "ClickstreamOptions", "ElementClick", "PageView", "PageViewEnd",
    "PageViewStart", "QualityChange", "SearchFilter", "SessionStream", "VideoComplete", "click_event_type",
    "clickstream_pipeline",
    "generate_sessions", "register",
]
