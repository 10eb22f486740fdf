"""Routes the clinicians' page needs besides its static files (stub until the page lands)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
