"""``transerve-client``: health, models, translate and classify from the shell (argparse: no extra deps)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from transerve_client._requests import DetailedTranslation, read_glossary
from transerve_client.client import TranserveClient, TranserveError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transerve-client", description="Talk to a transerve server over gRPC.")
    p.add_argument("--url", default="localhost:8001", help="server address host:port (default %(default)s)")
    p.add_argument("--token", help="bearer token, when the server requires one")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS server; enables TLS")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("health", help="exit 0 when the server is ready, 1 when not")
    sub.add_parser("models", help="list the models ready for inference")
    sub.add_parser("languages", help="list the language pairs the server translates (direct and by pivot)")
    t = sub.add_parser("translate", help="translate TEXT arguments, a document (--file), or one text per stdin line")
    t.add_argument("texts", nargs="*", help="texts to translate, each sentence by sentence (none: read stdin)")
    t.add_argument("--file", help="translate this UTF-8 file as one document (paragraphs and line breaks kept)")
    t.add_argument("--whole", action="store_true",
                   help="send each text to the model as one input, unsplit (refused when too long for the model)")
    t.add_argument("--model", help="translator name (default: route by --to, else the server's default)")
    t.add_argument("--from", dest="source_language", metavar="LANG",
                   help="the texts' language (ISO 639 / BCP-47; default with --to: detected)")
    t.add_argument("--to", dest="target_language", metavar="LANG",
                   help="translate into LANG: the server picks the entry for the pair, or pivots")
    t.add_argument("--per-sentence", action="store_true",
                   help="detect each sentence's language (a text mixing languages), not one per text")
    t.add_argument("--beam-size", type=int, help="beam width (default: the model's)")
    t.add_argument("--max-new-tokens", type=int, help="generation budget per text")
    t.add_argument("--glossary", metavar="TERMS.TSV",
                   help="terms the translation must use: a UTF-8 file of 'source<TAB>target' lines")
    t.add_argument("--html", action="store_true",
                   help="the texts are HTML: tags, attributes, comments and entities kept, the text between them "
                        "translated (code, pre, script, style, translate=\"no\" left as they are)")
    t.add_argument("--scores", action="store_true",
                   help="also print each sentence's confidence (mean log-probability per token, lowest token "
                        "probability) to stderr, or into the --json output")
    c = sub.add_parser("classify", help="classify image files (PNG, JPEG, …)")
    c.add_argument("images", nargs="+", help="image files")
    c.add_argument("--model", help="classifier name (default: the server's default)")
    c.add_argument("--top-k", type=int, default=5, help="predictions per image (default %(default)s)")
    return p


def run(args: argparse.Namespace, client: TranserveClient) -> int:
    if args.command == "health":
        ok = client.health()
        print(json.dumps({"ready": ok}) if args.json else ("ready" if ok else "not ready"))
        return 0 if ok else 1
    if args.command == "models":
        names = client.models()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    if args.command == "translate":
        return _translate(args, client)
    if args.command == "languages":
        pairs = client.languages()
        print(json.dumps([dataclasses.asdict(p) for p in pairs]) if args.json else "\n".join(
            f"{p.source} → {p.target}" + (f" via {p.via}" if p.via else "") + f"  ({' + '.join(p.models)})"
            for p in pairs))
        return 0
    results = client.classify(args.images, model=args.model, top_k=args.top_k)
    if args.json:
        print(json.dumps([{"image": path, "predictions": [dataclasses.asdict(p) for p in preds]}
                          for path, preds in zip(args.images, results, strict=True)]))
    else:
        for path, preds in zip(args.images, results, strict=True):
            print(f"{path}: " + ", ".join(f"{p.label} {p.score:.3f}" for p in preds))
    return 0


def _translate(args: argparse.Namespace, client: TranserveClient) -> int:
    texts = _texts(args)
    glossary = read_glossary(args.glossary) if args.glossary else None
    out = client.translate_detailed(
        texts, model=args.model, source_language=args.source_language, target_language=args.target_language,
        detection="sentence" if args.per_sentence else "document", beam_size=args.beam_size,
        max_new_tokens=args.max_new_tokens, glossary=glossary, segmentation="whole" if args.whole else "sentences",
        scores=args.scores, format="html" if args.html else "text")
    if args.json:
        print(json.dumps([{"text": s, "translation": t.text, **_route(t),
                           **({"sentences": [dataclasses.asdict(x) for x in t.sentences]} if args.scores else {})}
                          for s, t in zip(texts, out, strict=True)], ensure_ascii=False))
        return 0
    for i, t in enumerate(out):
        if t.source_language:
            print(f"text {i}: {t.source_language}" + (f" (detected, {t.language_confidence:.2f})"
                                                      if t.language_confidence else "")
                  + (f" via {t.via}" if t.via else "") + f" by {' + '.join(t.models) or 'nothing (already there)'}",
                  file=sys.stderr)
    sys.stdout.write(out[0].text if args.file else "\n".join(t.text for t in out) + "\n")
    for i, t in enumerate(out):
        for s in t.sentences:
            print(f"text {i} sentence {texts[i][s.source[0]:s.source[1]][:40]!r}: mean log-prob "
                  f"{s.mean_log_prob:.3f}, lowest token probability {s.min_token_prob:.3f}", file=sys.stderr)
    return 0


def _route(t: DetailedTranslation) -> dict[str, object]:
    if not t.source_language:
        return {}
    return {"source_language": t.source_language, "language_confidence": t.language_confidence, "via": t.via,
            "models": t.models}


def _texts(args: argparse.Namespace) -> list[str]:
    if args.file:
        if args.texts:
            raise TypeError("translate: give texts or --file, not both")
        with open(args.file, encoding="utf-8") as f:
            return [f.read()]
    return args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with TranserveClient(args.url, token=args.token, tls=args.tls_ca or False, timeout=args.timeout) as client:
            return run(args, client)
    except TranserveError as e:
        print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
        return 2
    except (OSError, TypeError, ImportError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
