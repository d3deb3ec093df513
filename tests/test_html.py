"""HTML mode: pages read and rendered back (an identity translation gives the page back byte for byte), inline
elements carried by alignment (nested, reordered, unaligned), untouched elements, entities, malformed and very
deep pages, and the served ``format: html`` — its output parsed by html5lib (a browser's parser) to the same
element structure as its input."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import html5lib
import pytest
from helpers import running_server
from transerve.server.engine.html_document import parse_html
from transerve.server.engine.html_render import place, render_block, render_page
from transerve.server.engine.scoring import WordAlignment
from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import inference_pb2_grpc as ipb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

PAGES = [
    '<!DOCTYPE html>\n<html><head><title>Numbers</title><style>p { color: red }</style></head>\n<body>\n'
    '<h1 id="top">Seven hundred</h1>\n<p class="intro">Write <b>three hundred</b> and <i>forty-two</i>. Then '
    '<a href="/x?a=1&amp;b=2" title="nine">nineteen <em>eighty</em>-four</a>!</p>\n'
    '<ul><li>twelve</li><li>one <span>thousand</span></li></ul>\n<pre>twelve <b>kept</b></pre>\n'
    '<p translate="no">seven</p><div class="x notranslate">eight <b>nine</b></div>\n'
    '<p>seven&nbsp;&amp; eight &copy; <img src="a.png" alt="x"> nine<br>twelve<!-- note --> eleven</p>\n'
    '<script>if (a < b && c) { x("<p>") }</script>\n<code>one</code></body></html>',
    "plain text, no markup at all.",
    "<p>unclosed <b>bold and <i>italic</p><p>next",
    "<p>stray </i> end tag</p>",
    "<b>" * 3000 + "deep" + "</b>" * 3000,
]

MALFORMED = PAGES[2:4]


def identity(block_text: str) -> list[WordAlignment]:
    return [WordAlignment(m.span(), m.span()) for m in re.finditer(r"\w+|[^\w\s]", block_text)]


@pytest.mark.parametrize("page", PAGES)
def test_an_identity_translation_gives_the_page_back(page: str) -> None:
    """Every tag, attribute, comment, entity and untouched element is carried through the parse and the render
    exactly, whatever the page's shape."""
    parsed = parse_html(page)
    assert render_page(parsed, [render_block(b, b.text, identity(b.text)) for b in parsed.blocks]) == page


def test_untranslated_elements_are_not_blocks() -> None:
    texts = [b.text for b in parse_html(PAGES[0]).blocks]
    assert "Write three hundred and forty-two. Then nineteen eighty-four!" in texts
    for kept in ("twelve kept", "p { color", 'x("<p>")', "eight nine"):
        assert all(kept not in t for t in texts), kept
    assert "seven" not in texts and "one" not in texts  # translate="no", <code>


def test_inline_elements_follow_their_words_through_reordering() -> None:
    """Source "a <b>b</b> <i>c</i> d" translated "D C B A" (words reversed): b and i land on their words'
    translations when the order allows, and keep source order when it does not (siblings never cross)."""
    [block] = parse_html("a <b>bb</b> <i>cc</i> d").blocks
    words = [m.span() for m in re.finditer(r"\S+", block.text)]  # a, bb, cc, d
    translation = "D CC BB A"
    targets = [m.span() for m in re.finditer(r"\S+", translation)]
    alignments = [WordAlignment(s, t) for s, t in zip(words, reversed(targets), strict=True)]
    spans = place(block, alignments, len(translation))
    assert translation[slice(*spans[0])] == "BB"  # b: its own word
    assert spans[1][0] >= spans[0][1]  # i: after b, clamped (its word came first)
    assert render_block(block, translation, alignments).count("<b>") == 1


def test_nested_elements_stay_inside_their_parents() -> None:
    [block] = parse_html("<a href='#'>one <b>two</b></a> three").blocks
    translation = "zwei drei eins"
    src = [m.span() for m in re.finditer(r"\S+", block.text)]  # one, two, three
    tgt = [m.span() for m in re.finditer(r"\S+", translation)]  # zwei, drei, eins
    alignments = [WordAlignment(src[0], tgt[2]), WordAlignment(src[1], tgt[0]), WordAlignment(src[2], tgt[1])]
    a, b = place(block, alignments, len(translation))
    assert a[0] <= b[0] <= b[1] <= a[1]
    assert render_block(block, translation, alignments) == "<a href='#'>zwei drei eins<b></b></a>" or \
        a == (0, len(translation))


def test_unaligned_elements_and_pieces_stay_by_their_neighbour() -> None:
    [block] = parse_html("seven <img src=x> twelve <b></b>").blocks
    translation = "sieben zwölf"
    assert block.text == "seven  twelve "
    alignments = [WordAlignment((0, 5), (0, 6)), WordAlignment((7, 13), (7, 12))]
    assert render_block(block, translation, alignments) == "sieben <img src=x>zwölf<b></b>"


def structure(page: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every element as a browser builds it (html5lib's tree), in document order: tag and attributes."""
    tree = html5lib.parse(page, namespaceHTMLElements=False)
    return [(e.tag, tuple(sorted(e.attrib.items()))) for e in tree.iter() if isinstance(e.tag, str)]


@pytest.fixture(scope="module")
def channel(small_repo: Path) -> Iterator[grpc.Channel]:
    with running_server(small_repo) as server, grpc.insecure_channel(server.address) as channel:
        yield channel


def translate_html(channel: grpc.Channel, pages: list[str], **options: object) -> list[str]:
    request = tpb.TranslateRequest(model="tiny-mt", texts=pages, options=tpb.TranslateOptions(
        format=tpb.FORMAT_HTML, max_new_tokens=8, **options))  # type: ignore[arg-type]
    return [t.text for t in tpb_grpc.TranslatorStub(channel).Translate(request, timeout=120).translations]


def test_served_pages_keep_their_element_structure(channel: grpc.Channel) -> None:
    """A random model's translations of every page keep every tag in order; the well-formed ones (3 000 deep
    included) parse to the element tree their input parses to; untouched elements come back as sent."""
    out = translate_html(channel, PAGES)
    for page, translated in zip(PAGES, out, strict=True):
        assert re.findall(r"<[^>]*>", translated) == re.findall(r"<[^>]*>", page)  # every tag, in order
        if page not in MALFORMED:  # a browser re-opens unclosed <b>/<i> only where text follows, which varies
            assert structure(translated) == structure(page)
    for kept in ("<pre>twelve <b>kept</b></pre>", '<p translate="no">seven</p>',
                 '<div class="x notranslate">eight <b>nine</b></div>', '<script>if (a < b && c) { x("<p>") }</script>',
                 "<code>one</code>", "<style>p { color: red }</style>", '<a href="/x?a=1&amp;b=2" title="nine">'):
        assert kept in out[0], kept


def test_html_requests_share_the_text_options(channel: grpc.Channel) -> None:
    """Glossaries apply; the stream answers the page whole; KServe takes ``format``; wrong combinations and
    markup-only pages are INVALID_ARGUMENT naming the field, and the server goes on."""
    glossary = [tpb.GlossaryEntry(source="seven", target="sieben")]
    assert "sieben" in translate_html(channel, ["<p><b>seven</b> hundred</p>"], glossary=glossary)[0]
    stub = tpb_grpc.TranslatorStub(channel)
    streamed = "".join(r.piece for r in stub.TranslateStream(tpb.TranslateStreamRequest(
        model="tiny-mt", text=PAGES[2], options=tpb.TranslateOptions(format=tpb.FORMAT_HTML, max_new_tokens=8)),
        timeout=60))
    assert streamed == translate_html(channel, [PAGES[2]])[0]
    kserve = ipb_grpc.GRPCInferenceServiceStub(channel)
    request = ipb.ModelInferRequest(model_name="tiny-mt", inputs=[ipb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=ipb.InferTensorContents(bytes_contents=[b"<p>a</p>"]))])
    request.parameters["format"].string_param = "html"
    request.parameters["max_new_tokens"].int64_param = 8
    answer = kserve.ModelInfer(request, timeout=60)
    assert answer.raw_output_contents[0][4:].decode().startswith("<p>")
    for pages, options, message in (
            (["<p> </p><!-- x --><br>"], {}, "texts[0]: nothing to translate (only markup)"),
            (["<p>seven</p>"], {"scores": True}, "format: html returns the page"),
            (["<p>seven</p>"], {"segmentation": tpb.SEGMENTATION_WHOLE}, "format: html returns the page")):
        with pytest.raises(grpc.RpcError) as error:
            translate_html(channel, pages, **options)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in str(error.value.details())
    request.parameters["format"].string_param = "markdown"
    with pytest.raises(grpc.RpcError) as error:
        kserve.ModelInfer(request, timeout=60)
    assert 'parameters.format: must be "text" or "html"' in str(error.value.details())
    assert json.loads(json.dumps(translate_html(channel, ["<p>seven</p>"])))[0].startswith("<p>")
