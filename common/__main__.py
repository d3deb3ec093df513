from transerve.cli import app

app()
