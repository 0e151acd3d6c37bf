"""PivotalPrompt: prompt text with the trained token's trigger written in, for CLIPTextEncode."""

from ..pti_ops.errors import InvalidInputError
from .inputs import string_input


class PivotalPrompt:
    """A prompt template + the `embedding:NAME` trigger → prompt text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "template": string_input("an anime illustration of {} standing on the beach", "The prompt, with {} where "
                    "the trained character goes (every {} is replaced). Describe the new scene; keep the training "
                    "prompts' style words for the closest likeness.", multiline=True),
                "trigger": ("STRING", {"forceInput": True, "tooltip": "The trigger output of TokenInversion or "
                    "PivotalLoRATune (embedding:NAME)."}),
            }
        }  # fmt: skip

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The prompt text, for the text input of CLIPTextEncode.",)
    FUNCTION = "format"
    CATEGORY = "pivotal_tuning/prompt"
    DESCRIPTION = "Writes the trained token's trigger (embedding:NAME) into a prompt template at {}."

    def format(self, template, trigger):
        if "{}" not in template:
            raise InvalidInputError(
                f"`template` {template!r} has no {{}}: write {{}} where the trained character goes, "
                "e.g. 'an anime illustration of {} on the beach'."
            )
        if not trigger or not trigger.strip():
            raise InvalidInputError("`trigger` is empty: connect the trigger output of TokenInversion or PivotalLoRATune.")
        return (write_trigger(template, trigger.strip()),)


def write_trigger(template: str, trigger: str) -> str:
    """`template` with every {} replaced by `trigger`, followed by a space where a word follows.

    ComfyUI reads `embedding:NAME` up to the next space or comma, so one must come after the trigger.
    """
    pieces = template.split("{}")
    prompt = pieces[0]
    for piece in pieces[1:]:
        prompt += trigger + ("" if not piece or piece[0] in " ,\t\n" else " ") + piece
    return prompt.strip()


NODE_CLASS_MAPPINGS = {"PivotalPrompt": PivotalPrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"PivotalPrompt": "Pivotal Prompt"}
