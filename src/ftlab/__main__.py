"""``python -m ftlab`` (also ``accelerate launch -m ftlab ...``)."""

from ftlab.cli import app

if __name__ == "__main__":
    app()
